// EcoFormer's kernelized hash on CPU, inference (hashing/kernel_hash.py, DESIGN §3 step 3): one pass per token and
// head, rows split over ATen's intra-op threads, no (L, m) intermediate in memory:
//
//   kernel_hash_codes(z (H, L, d), anchors (H, m, d), projection A (H, b, m), kernel_mean μ (H, m),
//                     bandwidth σ (H, 1) or (H, images), images) -> codes (H, L, b) in {-1, +1}
//
//   r = 1 / max(‖z‖, 1e-12),  s_j = (z·a_j)·(r/σ) - c_j/σ  with c_j = (1 + ‖a_j‖²)/2,  κ_j = exp(s_j),
//   y = A κ - A μ,  code = copysign(1, y).
//
// z may be any view whose last dimension is contiguous (qk's heads read in place). A bandwidth of shape
// (H, images) is per image and head (the authors' per-input σ, computed by kernel_hash.py from the same z).
// float32 only; the exponential is a range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial (relative error
// below 2e-7 over the float range), written so that the compiler vectorises it. kernel_hash.py's PyTorch ops are
// the reference this kernel is tested against and the fallback where it cannot be built.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

typedef float Vec __attribute__((vector_size(32)));  // 8 floats: AVX, or two SSE/NEON registers
typedef int32_t IntVec __attribute__((vector_size(32)));
constexpr int kLanes = 8;
constexpr int kMaxVecs = 8;  // anchors and bits up to 64 (8 vectors of 8)

inline Vec broadcast(float x) { return Vec{} + x; }

// exp(x) for x <= 0 (s_j = -‖u - a_j‖²/(2σ)), clamped to [-87, 0] (exp underflows to ~1e-38 at -87).
inline Vec exp_nonpositive(Vec x) {
  x = x > 0.0f ? broadcast(0.0f) : x;
  x = x >= -87.0f ? x : broadcast(-87.0f);  // also NaN -> -87: the shift below stays defined
  const Vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2): 1.5·2^23 trick
  const Vec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;             // x - n·ln2 in two parts (Cody-Waite)
  Vec p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IntVec bits = (__builtin_convertvector(n, IntVec) + 127) << 23;  // 2^n, n in [-126, 0]
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr int32_t kSignBit = INT32_MIN, kOneBits = 0x3f800000;  // float bit patterns: sign, 1.0f

// ‖x‖² of d floats, in kLanes partial sums (then the scalar tail).
inline float squared_norm(const float* x, int64_t d) {
  Vec acc{};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    Vec v;
    std::memcpy(&v, x + k, sizeof(v));
    acc += v * v;
  }
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += acc[i];
  for (; k < d; ++k) sum += x[k] * x[k];
  return sum;
}

// Per head, laid out for the inner loops (zero padding contributes nothing: padded anchors get Aᵀ rows of 0).
struct HeadTables {
  std::vector<Vec> anchors_t;  // aᵀ (d, MV)
  std::vector<Vec> proj_t;     // Aᵀ (m, BV)
  std::vector<Vec> offsets;    // c (MV)
  std::vector<Vec> bias;       // -Aμ (BV)
};

HeadTables make_tables(const float* a, const float* p, const float* mu, int64_t m, int64_t d, int64_t b, int mv,
                       int bv) {
  HeadTables t{std::vector<Vec>(d * mv, Vec{}), std::vector<Vec>(m * bv, Vec{}), std::vector<Vec>(mv, Vec{}),
               std::vector<Vec>(bv, Vec{})};
  for (int64_t j = 0; j < m; ++j) {
    float norm2 = 0.0f;
    for (int64_t k = 0; k < d; ++k) {
      t.anchors_t[k * mv + j / kLanes][j % kLanes] = a[j * d + k];
      norm2 += a[j * d + k] * a[j * d + k];
    }
    t.offsets[j / kLanes][j % kLanes] = 0.5f * (1.0f + norm2);
  }
  for (int64_t i = 0; i < b; ++i) {
    float dot = 0.0f;
    for (int64_t j = 0; j < m; ++j) {
      t.proj_t[j * bv + i / kLanes][i % kLanes] = p[i * m + j];
      dot += p[i * m + j] * mu[j];
    }
    t.bias[i / kLanes][i % kLanes] = -dot;
  }
  return t;
}

// Rows [begin, end) of one head: z rows at z + row·z_stride, codes (b floats) at out + row·b.
template <int MV, int BV>
void hash_rows(const HeadTables& t, const float* z, int64_t z_stride, const float* inv_sigma_of_row,
               int64_t sigma_block, int64_t begin, int64_t end, int64_t m, int64_t d, int64_t b, float* out) {
  constexpr int kTile = MV >= 6 ? 1 : 12 / MV < 4 ? 12 / MV : 4;  // rows per tile, kTile·MV accumulators
  for (int64_t row0 = begin; row0 < end; row0 += kTile) {
    const float* zr[kTile];
    float scale[kTile], inv_sigma[kTile];
    for (int r = 0; r < kTile; ++r) {
      const int64_t row = std::min(row0 + r, end - 1);  // a short last tile repeats its last row
      zr[r] = z + row * z_stride;
      inv_sigma[r] = inv_sigma_of_row[row / sigma_block];
      scale[r] = inv_sigma[r] / std::max(std::sqrt(squared_norm(zr[r], d)), 1e-12f);
    }
    Vec s[kTile][MV] = {};
    for (int64_t k = 0; k < d; ++k) {
      const Vec* ak = t.anchors_t.data() + k * MV;
      for (int r = 0; r < kTile; ++r) {
        const Vec zk = broadcast(zr[r][k]);
        for (int v = 0; v < MV; ++v) s[r][v] += zk * ak[v];
      }
    }
    Vec y[kTile][BV];
    for (int r = 0; r < kTile; ++r) {
      for (int v = 0; v < MV; ++v) s[r][v] = exp_nonpositive(s[r][v] * scale[r] - t.offsets[v] * inv_sigma[r]);
      for (int v = 0; v < BV; ++v) y[r][v] = t.bias[v];
    }
    for (int64_t j = 0; j < m; ++j) {
      const Vec* pj = t.proj_t.data() + j * BV;
      for (int r = 0; r < kTile; ++r) {
        const Vec kj = broadcast(s[r][j / kLanes][j % kLanes]);
        for (int v = 0; v < BV; ++v) y[r][v] += kj * pj[v];
      }
    }
    for (int r = 0; r < kTile && row0 + r < end; ++r) {
      float* o = out + (row0 + r) * b;
      for (int v = 0; v < BV; ++v) {  // copysign(1, y): y's sign bit on the bits of 1.0f
        IntVec code;
        std::memcpy(&code, &y[r][v], sizeof(code));
        code = (code & kSignBit) | kOneBits;
        std::memcpy(o + v * kLanes, &code, sizeof(float) * std::min<int64_t>(kLanes, b - v * kLanes));
      }
    }
  }
}

using RowsFn = void (*)(const HeadTables&, const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
                        int64_t, int64_t, float*);

template <int MV, int... BV>
constexpr std::array<RowsFn, sizeof...(BV)> row_fns_for(std::integer_sequence<int, BV...>) {
  return {&hash_rows<MV, BV + 1>...};
}

template <int... MV>
constexpr std::array<std::array<RowsFn, kMaxVecs>, sizeof...(MV)> row_fn_table(std::integer_sequence<int, MV...>) {
  return {row_fns_for<MV + 1>(std::make_integer_sequence<int, kMaxVecs>{})...};
}

at::Tensor kernel_hash_codes(const at::Tensor& z_in, const at::Tensor& anchors, const at::Tensor& projection,
                             const at::Tensor& kernel_mean, const at::Tensor& bandwidth, int64_t images) {
  TORCH_CHECK(z_in.dim() == 3 && z_in.scalar_type() == at::kFloat,
              "kernel_hash_codes: expected float32 z (H, L, d), got ", z_in.scalar_type(), " ", z_in.sizes());
  const int64_t H = z_in.size(0), L = z_in.size(1), d = z_in.size(2);
  TORCH_CHECK(anchors.dim() == 3 && anchors.size(0) == H && anchors.size(2) == d,
              "kernel_hash_codes: anchors must be (H, m, d) = (", H, ", m, ", d, "), got ", anchors.sizes());
  const int64_t m = anchors.size(1);
  TORCH_CHECK(projection.dim() == 3 && projection.size(0) == H && projection.size(2) == m,
              "kernel_hash_codes: projection must be (H, b, m), got ", projection.sizes());
  const int64_t b = projection.size(1);
  TORCH_CHECK(m >= 1 && m <= kLanes * kMaxVecs && b >= 1 && b <= kLanes * kMaxVecs,
              "kernel_hash_codes: supports 1..64 anchors and bits, got ", m, " and ", b);
  TORCH_CHECK(kernel_mean.sizes() == at::IntArrayRef({H, m}), "kernel_hash_codes: kernel_mean must be (H, m)");
  TORCH_CHECK(images >= 1 && L % images == 0, "kernel_hash_codes: L=", L, " is not a multiple of images=", images);
  TORCH_CHECK(bandwidth.dim() == 2 && bandwidth.size(0) == H && (bandwidth.size(1) == 1 || bandwidth.size(1) == images),
              "kernel_hash_codes: bandwidth must be (H, 1) or (H, images), got ", bandwidth.sizes());
  for (const at::Tensor* t : {&anchors, &projection, &kernel_mean, &bandwidth})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "kernel_hash_codes: buffers must be float32");

  const at::Tensor z = z_in.stride(2) == 1 ? z_in : z_in.contiguous();
  const int mv = static_cast<int>((m + kLanes - 1) / kLanes), bv = static_cast<int>((b + kLanes - 1) / kLanes);
  const at::Tensor a = anchors.contiguous(), p = projection.contiguous(), mu = kernel_mean.contiguous();
  std::vector<HeadTables> tables;
  for (int64_t h = 0; h < H; ++h)
    tables.push_back(make_tables(a.data_ptr<float>() + h * m * d, p.data_ptr<float>() + h * b * m,
                                 mu.data_ptr<float>() + h * m, m, d, b, mv, bv));
  const at::Tensor inv_sigma = bandwidth.reciprocal().contiguous();  // (H, 1) or (H, images)
  const int64_t sigma_block = bandwidth.size(1) == 1 ? L : L / images;

  static constexpr auto kTable = row_fn_table(std::make_integer_sequence<int, kMaxVecs>{});
  const RowsFn rows_fn = kTable[mv - 1][bv - 1];
  at::Tensor out = at::empty({H, L, b}, z.options());
  const float* zp = z.data_ptr<float>();
  const float* sp = inv_sigma.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kBlock = 64;  // rows per task
  const int64_t blocks = (L + kBlock - 1) / kBlock;
  at::parallel_for(0, H * blocks, 4, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t h = task / blocks, begin = (task % blocks) * kBlock, end = std::min(begin + kBlock, L);
      rows_fn(tables[h], zp + h * z.stride(0), z.stride(1), sp + h * inv_sigma.size(1), sigma_block, begin, end, m,
              d, b, op + h * L * b);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ecopvt, m) {
  m.def("kernel_hash_codes(Tensor z, Tensor anchors, Tensor projection, Tensor kernel_mean, Tensor bandwidth, "
        "int images) -> Tensor");
}
TORCH_LIBRARY_IMPL(ecopvt, CPU, m) { m.impl("kernel_hash_codes", &kernel_hash_codes); }
