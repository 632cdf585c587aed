// EcoFormer's linear attention on CPU, inference (attention/ecoformer.py, DESIGN §3): per image and head g,
//
//   linear_attention(codes (H, B, N, b) ±1, values (B, N, H, d), beta, own_value) -> out (B, N, H·d),
//   S = Σ_j h_j v_jᵀ (b, d),  z = Σ_j h_j (b),  w_n = Σ_j v_j (paper) or v_n (own_value: the authors' code),
//   out_n = (h_nᵀS + β·w_n) / (h_nᵀz + β·N).
//
// Values are read in place from the value projection's (B, N, C) output (heads strided, last dimension
// contiguous) and the output is written in (B, N, C) order, so no head permutation is copied either way. Two passes:
// the summaries of each (head, image) (over token ranges, then summed), then every token's output; float32, ATen's
// intra-op threads.
// ecoformer.py's _LinearAttention is the reference this kernel is tested against and the fallback where it cannot
// be built.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

typedef float Vec __attribute__((vector_size(32)));  // 8 floats: AVX, or two SSE/NEON registers
constexpr int kLanes = 8;
constexpr int kMaxVecs = 8;  // head size up to 64

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Pass 1 of one group: S (b, DV vectors), z (b), Σ_j v_j (DV vectors), four rows of S at a time in registers.
template <int DV>
void summarise(const float* codes, const float* v, int64_t v_stride, int64_t N, int64_t b, Vec* S, float* z,
               Vec* w) {
  constexpr int kRows = 4;
  for (int64_t k0 = 0; k0 < b; k0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, b - k0));
    Vec acc[kRows][DV] = {};
    Vec vsum[DV] = {};
    float zsum[kRows] = {};
    for (int64_t n = 0; n < N; ++n) {
      const float* hn = codes + n * b + k0;
      Vec vn[DV];
      for (int j = 0; j < DV; ++j) vn[j] = load(v + n * v_stride + j * kLanes);
      for (int r = 0; r < kRows; ++r) {
        const float c = r < rows ? hn[r] : 0.0f;
        for (int j = 0; j < DV; ++j) acc[r][j] += c * vn[j];
        zsum[r] += c;
      }
      if (k0 == 0)
        for (int j = 0; j < DV; ++j) vsum[j] += vn[j];
    }
    for (int r = 0; r < rows; ++r) {
      for (int j = 0; j < DV; ++j) S[(k0 + r) * DV + j] = acc[r][j];
      z[k0 + r] = zsum[r];
    }
    if (k0 == 0)
      for (int j = 0; j < DV; ++j) w[j] = vsum[j];
  }
}

// Pass 2 of tokens [begin, end) of one group.
template <int DV>
void attend(const float* codes, const float* v, int64_t v_stride, const Vec* S, const float* z, const Vec* w,
            int64_t N, int64_t b, float beta, bool own_value, int64_t begin, int64_t end, float* out,
            int64_t out_stride) {
  for (int64_t n = begin; n < end; ++n) {
    const float* hn = codes + n * b;
    Vec acc[DV];
    for (int j = 0; j < DV; ++j) acc[j] = beta * (own_value ? load(v + n * v_stride + j * kLanes) : w[j]);
    float denominator = beta * static_cast<float>(N);
    for (int64_t k = 0; k < b; ++k) {
      const float c = hn[k];
      for (int j = 0; j < DV; ++j) acc[j] += c * S[k * DV + j];
      denominator += c * z[k];
    }
    for (int j = 0; j < DV; ++j) {
      const Vec o = acc[j] / denominator;
      std::memcpy(out + n * out_stride + j * kLanes, &o, sizeof(o));
    }
  }
}

struct Kernels {
  decltype(&summarise<1>) summarise_fn;
  decltype(&attend<1>) attend_fn;
};

template <int... DV>
constexpr std::array<Kernels, sizeof...(DV)> kernel_table(std::integer_sequence<int, DV...>) {
  return {Kernels{&summarise<DV + 1>, &attend<DV + 1>}...};
}

at::Tensor linear_attention(const at::Tensor& codes_in, const at::Tensor& values, double beta, bool own_value) {
  TORCH_CHECK(codes_in.dim() == 4 && values.dim() == 4, "linear_attention: expected codes (H, B, N, b) and values ",
              "(B, N, H, d), got ", codes_in.sizes(), " and ", values.sizes());
  const int64_t H = codes_in.size(0), B = codes_in.size(1), N = codes_in.size(2), b = codes_in.size(3);
  const int64_t d = values.size(3);
  TORCH_CHECK(values.size(0) == B && values.size(1) == N && values.size(2) == H,
              "linear_attention: values ", values.sizes(), " do not match codes ", codes_in.sizes());
  TORCH_CHECK(d >= kLanes && d % kLanes == 0 && d <= kLanes * kMaxVecs, "linear_attention: head size ", d,
              " is not a multiple of 8 from 8 to 64");
  TORCH_CHECK(codes_in.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "linear_attention: codes and values must be float32");
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor v = values.stride(3) == 1 ? values : values.contiguous();
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float* cp = codes.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int dv = static_cast<int>(d / kLanes);
  static constexpr auto kTable = kernel_table(std::make_integer_sequence<int, kMaxVecs>{});
  const Kernels fns = kTable[dv - 1];

  // Pass 1: the summaries, over `chunks` token ranges per group (so that one image and head still uses every
  // thread), then summed per group.
  const int64_t groups = H * B;  // g = h·B + image
  const int64_t threads_per_group = (at::get_num_threads() + groups - 1) / groups;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(N / 256, threads_per_group));
  const int64_t chunk_size = (N + chunks - 1) / chunks;
  std::vector<Vec> partial_summary(groups * chunks * b * dv), partial_value_sum(groups * chunks * dv);
  std::vector<float> partial_code_sum(groups * chunks * b);
  at::parallel_for(0, groups * chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t g = task / chunks, h = g / B, image = g % B;
      const int64_t begin = (task % chunks) * chunk_size, rows = std::max<int64_t>(0, std::min(chunk_size, N - begin));
      fns.summarise_fn(cp + (g * N + begin) * b, vp + image * vs0 + begin * vs1 + h * vs2, vs1, rows, b,
                       partial_summary.data() + task * b * dv, partial_code_sum.data() + task * b,
                       partial_value_sum.data() + task * dv);
    }
  });
  std::vector<Vec> summary(groups * b * dv, Vec{}), value_sum(groups * dv, Vec{});
  std::vector<float> code_sum(groups * b, 0.0f);
  for (int64_t task = 0; task < groups * chunks; ++task) {
    const int64_t g = task / chunks;
    for (int64_t i = 0; i < b * dv; ++i) summary[g * b * dv + i] += partial_summary[task * b * dv + i];
    for (int64_t i = 0; i < b; ++i) code_sum[g * b + i] += partial_code_sum[task * b + i];
    for (int64_t i = 0; i < dv; ++i) value_sum[g * dv + i] += partial_value_sum[task * dv + i];
  }

  at::Tensor out = at::empty({B, N, H * d}, v.options().memory_format(at::MemoryFormat::Contiguous));
  float* op = out.data_ptr<float>();
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, groups * blocks, 4, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t g = task / blocks, h = g / B, image = g % B;
      const int64_t begin = (task % blocks) * kBlock, end = std::min(begin + kBlock, N);
      fns.attend_fn(cp + g * N * b, vp + image * vs0 + h * vs2, vs1, summary.data() + g * b * dv,
                    code_sum.data() + g * b, value_sum.data() + g * dv, N, b, static_cast<float>(beta), own_value,
                    begin, end, op + image * N * H * d + h * d, H * d);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ecopvt, m) {
  m.def("linear_attention(Tensor codes, Tensor values, float beta, bool own_value) -> Tensor");
}
TORCH_LIBRARY_IMPL(ecopvt, CPU, m) { m.impl("linear_attention", &linear_attention); }
