// Bitformer's packed path on CPU (attention/bitformer.py, DESIGN §5), one pass each, rows split over ATen's
// intra-op threads:
//   pack_sign_bits: z (R, T) floats -> (R, 1) words, bit t set where z_t >= 0 (sign +1), in the narrowest signed
//     integer dtype holding T <= 64 bits (int8/16/32/64);
//   xor_popcount_scores: q (G, N) and k (G, M) words of one dtype -> s (G, N, M) in that dtype,
//     s_ij = T - 2 * popcount(q_i XOR k_j).
// Built on first use by torch.utils.cpp_extension (bitformer.bit_kernels); bitformer.py's PyTorch ops are the
// fallback and the reference these kernels are tested against.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

namespace {

template <typename Word>
void scores_kernel(const Word* q, const Word* k, Word* out, int64_t groups, int64_t n, int64_t m, int64_t bits) {
  using Bits = std::make_unsigned_t<Word>;
  const Word t = static_cast<Word>(bits);
  at::parallel_for(0, groups * n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const Bits qi = static_cast<Bits>(q[row]);
      const Word* kg = k + (row / n) * m;
      Word* o = out + row * m;
      for (int64_t j = 0; j < m; ++j) {
        const Bits diff = qi ^ static_cast<Bits>(kg[j]);
        const int ones = sizeof(Word) == 8 ? __builtin_popcountll(diff) : __builtin_popcount(diff);
        o[j] = static_cast<Word>(t - 2 * ones);
      }
    }
  });
}

template <typename Real, typename Word>
void pack_kernel(const Real* z, Word* out, int64_t rows, int64_t bits) {
  using Bits = std::make_unsigned_t<Word>;
  at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const Real* zr = z + row * bits;
      Bits word = 0;
      for (int64_t t = 0; t < bits; ++t) word |= static_cast<Bits>(zr[t] >= Real(0)) << t;
      out[row] = static_cast<Word>(word);
    }
  });
}

at::Tensor pack_sign_bits(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) >= 1 && codes.size(1) <= 64,
              "pack_sign_bits: expected (R, T) codes with 1 <= T <= 64, got ", codes.sizes());
  const at::Tensor z = codes.contiguous();
  const int64_t rows = z.size(0), bits = z.size(1);
  const at::ScalarType word = bits <= 8 ? at::kChar : bits <= 16 ? at::kShort : bits <= 32 ? at::kInt : at::kLong;
  at::Tensor out = at::empty({rows, 1}, z.options().dtype(word));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "pack_sign_bits", [&] {
    using Real = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(word, "pack_sign_bits", [&] {
      pack_kernel(z.data_ptr<Real>(), out.data_ptr<scalar_t>(), rows, bits);
    });
  });
  return out;
}

at::Tensor xor_popcount_scores(const at::Tensor& q_words, const at::Tensor& k_words, int64_t bits) {
  TORCH_CHECK(q_words.dim() == 2 && k_words.dim() == 2 && q_words.size(0) == k_words.size(0),
              "xor_popcount_scores: expected q (G, N) and k (G, M) words, got ", q_words.sizes(), " and ",
              k_words.sizes());
  TORCH_CHECK(q_words.scalar_type() == k_words.scalar_type(), "xor_popcount_scores: q and k dtypes differ");
  TORCH_CHECK(at::isSignedType(q_words.scalar_type()) && !at::isFloatingType(q_words.scalar_type()),
              "xor_popcount_scores: words must be int8/16/32/64 (signed scores), got ", q_words.scalar_type());
  TORCH_CHECK(bits >= 1 && bits <= 64 && bits <= static_cast<int64_t>(q_words.element_size()) * 8,
              "xor_popcount_scores: bits=", bits, " does not fit ", q_words.scalar_type(), " words");
  const at::Tensor q = q_words.contiguous(), k = k_words.contiguous();
  const int64_t groups = q.size(0), n = q.size(1), m = k.size(1);
  at::Tensor out = at::empty({groups, n, m}, q.options());
  AT_DISPATCH_INTEGRAL_TYPES(q.scalar_type(), "xor_popcount_scores", [&] {
    scores_kernel(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), groups, n, m, bits);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ecopvt, m) {
  m.def("pack_sign_bits(Tensor codes) -> Tensor");
  m.def("xor_popcount_scores(Tensor q_words, Tensor k_words, int bits) -> Tensor");
}
TORCH_LIBRARY_IMPL(ecopvt, CPU, m) {
  m.impl("pack_sign_bits", &pack_sign_bits);
  m.impl("xor_popcount_scores", &xor_popcount_scores);
}
