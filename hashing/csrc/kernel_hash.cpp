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
#include <ATen/ops/empty_strided.h>
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

inline Vec broadcast(float x) { return Vec{x, x, x, x, x, x, x, x}; }

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

// dst[0, count) = src[0, count): whole vectors, then the tail (a memcpy of constant size compiles to moves).
inline void copy_floats(float* dst, const float* src, int64_t count) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) std::memcpy(dst + i, src + i, sizeof(Vec));
  for (; i < count; ++i) dst[i] = src[i];
}

constexpr int32_t kSignBit = INT32_MIN, kOneBits = 0x3f800000;  // float bit patterns: sign, 1.0f

inline float lane_sum(const Vec& v) {
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// ‖x‖² of d floats, in kLanes partial sums (then the scalar tail).
inline float squared_norm(const float* x, int64_t d) {
  Vec acc{};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    Vec v;
    std::memcpy(&v, x + k, sizeof(v));
    acc += v * v;
  }
  float sum = lane_sum(acc);
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

// Rows per tile of the row loops: kTile·MV accumulators in registers.
constexpr int tile_rows(int mv) { return mv >= 6 ? 1 : 12 / mv < 4 ? 12 / mv : 4; }

// t'_r = z_r·a (MV vectors per row) for the kTile rows zr.
// Inlined by force: as a call, its accumulators leave the registers (the forward was 1.3x slower).
template <int MV, int kTile>
__attribute__((always_inline)) inline void anchor_products(const HeadTables& t, const float* const (&zr)[kTile],
                                                           int64_t d, Vec (&product)[kTile][MV]) {
  for (int r = 0; r < kTile; ++r)
    for (int v = 0; v < MV; ++v) product[r][v] = Vec{};
  for (int64_t k = 0; k < d; ++k) {
    const Vec* ak = t.anchors_t.data() + k * MV;
    for (int r = 0; r < kTile; ++r) {
      const Vec zk = broadcast(zr[r][k]);
      for (int v = 0; v < MV; ++v) product[r][v] += zk * ak[v];
    }
  }
}

// Rows [begin, end) of one head: z rows at z + row·z_stride, codes (b floats) at out + row·b.
template <int MV, int BV>
void hash_rows(const HeadTables& t, const float* z, int64_t z_stride, const float* inv_sigma_of_row,
               int64_t sigma_block, int64_t begin, int64_t end, int64_t m, int64_t d, int64_t b, float* out) {
  constexpr int kTile = tile_rows(MV);
  for (int64_t row0 = begin; row0 < end; row0 += kTile) {
    const float* zr[kTile];
    float scale[kTile], inv_sigma[kTile];
    for (int r = 0; r < kTile; ++r) {
      const int64_t row = std::min(row0 + r, end - 1);  // a short last tile repeats its last row
      zr[r] = z + row * z_stride;
      inv_sigma[r] = inv_sigma_of_row[row / sigma_block];
      scale[r] = inv_sigma[r] / std::max(std::sqrt(squared_norm(zr[r], d)), 1e-12f);
    }
    Vec s[kTile][MV];
    anchor_products<MV, kTile>(t, zr, d, s);
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
      alignas(32) float codes[BV * kLanes];
      for (int v = 0; v < BV; ++v) {  // copysign(1, y): y's sign bit on the bits of 1.0f
        IntVec code;
        std::memcpy(&code, &y[r][v], sizeof(code));
        code = (code & kSignBit) | kOneBits;
        std::memcpy(codes + v * kLanes, &code, sizeof(code));
      }
      copy_floats(out + (row0 + r) * b, codes, b);
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

constexpr int kChunk = 4;  // vectors of g_z accumulated in registers per pass over the anchors

// Vectors per row of d floats, padded to whole chunks.
inline int64_t padded_vectors(int64_t d) { return (d + kChunk * kLanes - 1) / (kChunk * kLanes) * kChunk; }

// Gradient rows [begin, end) of one head, in tiles of rows like hash_rows (whose forward is recomputed per row:
// the forward saves nothing but z):
//   g_s = (Aᵀ(g_code ⊙ 1[|y| <= 1])) ⊙ κ,  g̃ = g_s + correction,  coef = r²·Σ_j g̃_j t'_j (0 where ‖z‖ is clamped),
//   g_z = (r/σ)·(Σ_j g̃_j a_j − coef·z).
// first_pass (the per-input bandwidth, whose correction needs every row first): only Σ_j g_s,j s_j per row, into
// dots; the second pass recomputes the row.

template <int MV>
void hash_grad_rows(const HeadTables& t, const Vec* proj_rows, const Vec* anchor_rows, const float* z,
                    int64_t z_stride, const float* inv_sigma_of_row, const float* correction_of_row,
                    int64_t sigma_block, int64_t begin, int64_t end, int64_t m, int64_t d, int64_t b,
                    const float* grad_codes, bool first_pass, float* dots, float* grad_z) {
  constexpr int kTile = tile_rows(MV);
  const int64_t bv = (b + kLanes - 1) / kLanes;  // the bits' vectors: a runtime count (fewer instantiations to build)
  const int64_t dv = padded_vectors(d);  // g_z in chunks of kChunk vectors (anchor_rows is padded alike)
  std::vector<Vec> rows_z(kTile * dv), rows_grad(kTile * dv);
  for (int64_t row0 = begin; row0 < end; row0 += kTile) {
    const float* zr[kTile];
    const float* gr[kTile];
    float inv_norm[kTile], scale[kTile], inv_sigma[kTile];
    bool unclamped[kTile];
    for (int r = 0; r < kTile; ++r) {
      const int64_t row = std::min(row0 + r, end - 1);  // a short last tile repeats its last row
      zr[r] = z + row * z_stride;
      gr[r] = grad_codes + row * b;
      inv_sigma[r] = inv_sigma_of_row[row / sigma_block];
      const float norm = std::sqrt(squared_norm(zr[r], d));
      unclamped[r] = norm > 1e-12f;
      inv_norm[r] = 1.0f / std::max(norm, 1e-12f);
      scale[r] = inv_norm[r] * inv_sigma[r];
    }
    Vec product[kTile][MV];
    anchor_products<MV, kTile>(t, zr, d, product);
    Vec s[kTile][MV], kernel[kTile][MV], y[kTile][kMaxVecs];
    for (int r = 0; r < kTile; ++r) {
      for (int v = 0; v < MV; ++v) {
        s[r][v] = product[r][v] * scale[r] - t.offsets[v] * inv_sigma[r];
        kernel[r][v] = exp_nonpositive(s[r][v]);
      }
      for (int64_t v = 0; v < bv; ++v) y[r][v] = t.bias[v];
    }
    for (int64_t j = 0; j < m; ++j) {
      const Vec* pj = t.proj_t.data() + j * bv;
      for (int r = 0; r < kTile; ++r) {
        const Vec kj = broadcast(kernel[r][j / kLanes][j % kLanes]);
        for (int64_t v = 0; v < bv; ++v) y[r][v] += kj * pj[v];
      }
    }
    Vec gs[kTile][MV] = {};
    for (int64_t i = 0; i < b; ++i) {
      const Vec* pi = proj_rows + i * MV;
      for (int r = 0; r < kTile; ++r) {
        const float yi = y[r][i / kLanes][i % kLanes];
        const Vec gi = broadcast(yi <= 1.0f && yi >= -1.0f ? gr[r][i] : 0.0f);  // straight-through 1[|y| <= 1]
        for (int v = 0; v < MV; ++v) gs[r][v] += gi * pi[v];
      }
    }
    for (int r = 0; r < kTile; ++r)
      for (int v = 0; v < MV; ++v) gs[r][v] *= kernel[r][v];
    if (first_pass) {
      for (int r = 0; r < kTile && row0 + r < end; ++r) {
        Vec acc{};
        for (int v = 0; v < MV; ++v) acc += gs[r][v] * s[r][v];
        dots[row0 + r] = lane_sum(acc);
      }
      continue;
    }
    float coef[kTile];
    for (int r = 0; r < kTile; ++r) {
      const int64_t row = std::min(row0 + r, end - 1);
      const float correction = correction_of_row == nullptr ? 0.0f : correction_of_row[row / sigma_block];
      Vec acc{};
      for (int v = 0; v < MV; ++v) {
        gs[r][v] += correction;
        acc += gs[r][v] * product[r][v];  // padded anchors: t' = 0
      }
      const float sum = lane_sum(acc);
      coef[r] = unclamped[r] ? sum * inv_norm[r] * inv_norm[r] : 0.0f;
      copy_floats(reinterpret_cast<float*>(rows_z.data() + r * dv), zr[r], d);  // the padding stays 0
    }
    for (int64_t c = 0; c < dv; c += kChunk) {
      Vec acc[kTile][kChunk];
      for (int r = 0; r < kTile; ++r)
        for (int q = 0; q < kChunk; ++q) acc[r][q] = -coef[r] * rows_z[r * dv + c + q];
      for (int64_t j = 0; j < m; ++j) {
        const Vec* aj = anchor_rows + j * dv + c;
        for (int r = 0; r < kTile; ++r) {
          const Vec gj = broadcast(gs[r][j / kLanes][j % kLanes]);
          for (int q = 0; q < kChunk; ++q) acc[r][q] += gj * aj[q];
        }
      }
      for (int r = 0; r < kTile; ++r)
        for (int q = 0; q < kChunk; ++q) rows_grad[r * dv + c + q] = acc[r][q] * scale[r];
    }
    for (int r = 0; r < kTile && row0 + r < end; ++r)
      copy_floats(grad_z + (row0 + r) * z_stride, reinterpret_cast<const float*>(rows_grad.data() + r * dv), d);
  }
}

using GradRowsFn = decltype(&hash_grad_rows<1>);

template <int... MV>
constexpr std::array<GradRowsFn, sizeof...(MV)> grad_row_fn_table(std::integer_sequence<int, MV...>) {
  return {&hash_grad_rows<MV + 1>...};
}

// The checked inputs of both ops and their per-head tables.
struct HashInputs {
  at::Tensor z, inv_sigma;
  int64_t H, L, d, m, b, sigma_block;
  int mv, bv;
  std::vector<HeadTables> tables;
  std::vector<std::vector<Vec>> proj_rows, anchor_rows;  // A (b, MV) and a (m, padded_vectors(d)), for the backward
};

HashInputs check_inputs(const char* op, const at::Tensor& z_in, const at::Tensor& anchors,
                        const at::Tensor& projection, const at::Tensor& kernel_mean, const at::Tensor& bandwidth,
                        int64_t images) {
  TORCH_CHECK(z_in.dim() == 3 && z_in.scalar_type() == at::kFloat, op, ": expected float32 z (H, L, d), got ",
              z_in.scalar_type(), " ", z_in.sizes());
  const int64_t H = z_in.size(0), L = z_in.size(1), d = z_in.size(2);
  TORCH_CHECK(anchors.dim() == 3 && anchors.size(0) == H && anchors.size(2) == d, op,
              ": anchors must be (H, m, d) = (", H, ", m, ", d, "), got ", anchors.sizes());
  const int64_t m = anchors.size(1);
  TORCH_CHECK(projection.dim() == 3 && projection.size(0) == H && projection.size(2) == m, op,
              ": projection must be (H, b, m), got ", projection.sizes());
  const int64_t b = projection.size(1);
  TORCH_CHECK(m >= 1 && m <= kLanes * kMaxVecs && b >= 1 && b <= kLanes * kMaxVecs, op,
              ": supports 1..64 anchors and bits, got ", m, " and ", b);
  TORCH_CHECK(kernel_mean.sizes() == at::IntArrayRef({H, m}), op, ": kernel_mean must be (H, m)");
  TORCH_CHECK(images >= 1 && L % images == 0, op, ": L=", L, " is not a multiple of images=", images);
  TORCH_CHECK(bandwidth.dim() == 2 && bandwidth.size(0) == H && (bandwidth.size(1) == 1 || bandwidth.size(1) == images),
              op, ": bandwidth must be (H, 1) or (H, images), got ", bandwidth.sizes());
  for (const at::Tensor* t : {&anchors, &projection, &kernel_mean, &bandwidth})
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": buffers must be float32");

  // z is read in place where its last dimension is contiguous and its rows do not overlap (the gradient is written
  // in the same layout).
  const at::Tensor z = z_in.stride(2) == 1 && z_in.is_non_overlapping_and_dense() ? z_in : z_in.contiguous();
  const int mv = static_cast<int>((m + kLanes - 1) / kLanes), bv = static_cast<int>((b + kLanes - 1) / kLanes);
  const at::Tensor a = anchors.contiguous(), p = projection.contiguous(), mu = kernel_mean.contiguous();
  HashInputs in{z, bandwidth.reciprocal().contiguous(), H, L, d, m, b,
                bandwidth.size(1) == 1 ? L : L / images, mv, bv, {}, {}, {}};
  for (int64_t h = 0; h < H; ++h) {
    const float* ph = p.data_ptr<float>() + h * b * m;
    in.tables.push_back(make_tables(a.data_ptr<float>() + h * m * d, ph, mu.data_ptr<float>() + h * m, m, d, b, mv,
                                    bv));
    std::vector<Vec> rows(b * mv, Vec{});
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j < m; ++j) rows[i * mv + j / kLanes][j % kLanes] = ph[i * m + j];
    in.proj_rows.push_back(std::move(rows));
    const float* ah = a.data_ptr<float>() + h * m * d;
    const int64_t dv = padded_vectors(d);
    std::vector<Vec> anchor_rows(m * dv, Vec{});
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < d; ++k) anchor_rows[j * dv + k / kLanes][k % kLanes] = ah[j * d + k];
    in.anchor_rows.push_back(std::move(anchor_rows));
  }
  return in;
}

// Runs fn(h, begin, end) over blocks of 64 rows of every head in parallel.
template <typename F>
void for_row_blocks(int64_t H, int64_t L, const F& fn) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (L + kBlock - 1) / kBlock;
  at::parallel_for(0, H * blocks, 4, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t begin = (task % blocks) * kBlock;
      fn(task / blocks, begin, std::min(begin + kBlock, L));
    }
  });
}

at::Tensor kernel_hash_codes(const at::Tensor& z_in, const at::Tensor& anchors, const at::Tensor& projection,
                             const at::Tensor& kernel_mean, const at::Tensor& bandwidth, int64_t images) {
  const HashInputs in = check_inputs("kernel_hash_codes", z_in, anchors, projection, kernel_mean, bandwidth, images);
  static constexpr auto kTable = row_fn_table(std::make_integer_sequence<int, kMaxVecs>{});
  const RowsFn rows_fn = kTable[in.mv - 1][in.bv - 1];
  at::Tensor out = at::empty({in.H, in.L, in.b}, in.z.options().memory_format(at::MemoryFormat::Contiguous));
  const float* zp = in.z.data_ptr<float>();
  const float* sp = in.inv_sigma.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for_row_blocks(in.H, in.L, [&](int64_t h, int64_t begin, int64_t end) {
    rows_fn(in.tables[h], zp + h * in.z.stride(0), in.z.stride(1), sp + h * in.inv_sigma.size(1), in.sigma_block,
            begin, end, in.m, in.d, in.b, op + h * in.L * in.b);
  });
  return out;
}

// The gradient of kernel_hash_codes' codes to z through the straight-through sign, in z's layout. per_input: the
// bandwidth was computed from z (the authors' σ_bh = 2·mean_{n,j}(c_j − u_n·a_j)); its gradient adds
// 2/(N·m)·Σ_{n,j} g_s ⊙ s to g_s over the N tokens of each image, from a first pass.
at::Tensor kernel_hash_backward(const at::Tensor& grad_codes_in, const at::Tensor& z_in, const at::Tensor& anchors,
                                const at::Tensor& projection, const at::Tensor& kernel_mean,
                                const at::Tensor& bandwidth, int64_t images, bool per_input) {
  const HashInputs in = check_inputs("kernel_hash_backward", z_in, anchors, projection, kernel_mean, bandwidth,
                                     images);
  TORCH_CHECK(grad_codes_in.sizes() == at::IntArrayRef({in.H, in.L, in.b}) &&
                  grad_codes_in.scalar_type() == at::kFloat,
              "kernel_hash_backward: grad must be float32 (H, L, b), got ", grad_codes_in.sizes());
  TORCH_CHECK(!per_input || bandwidth.size(1) == images, "kernel_hash_backward: a per-input bandwidth is (H, images)");
  static constexpr auto kTable = grad_row_fn_table(std::make_integer_sequence<int, kMaxVecs>{});
  const GradRowsFn rows_fn = kTable[in.mv - 1];
  const at::Tensor grad_codes = grad_codes_in.contiguous();
  at::Tensor grad_z = at::empty_strided(in.z.sizes(), in.z.strides(), in.z.options());
  const float* zp = in.z.data_ptr<float>();
  const float* sp = in.inv_sigma.data_ptr<float>();
  const float* gp = grad_codes.data_ptr<float>();
  float* gzp = grad_z.data_ptr<float>();
  const int64_t z0 = in.z.stride(0), z1 = in.z.stride(1), sigmas = in.inv_sigma.size(1);
  std::vector<float> correction;
  if (per_input) {
    std::vector<float> dots(in.H * in.L);
    for_row_blocks(in.H, in.L, [&](int64_t h, int64_t begin, int64_t end) {
      rows_fn(in.tables[h], in.proj_rows[h].data(), in.anchor_rows[h].data(), zp + h * z0, z1, sp + h * sigmas, nullptr,
              in.sigma_block, begin, end, in.m, in.d, in.b, gp + h * in.L * in.b, true, dots.data() + h * in.L,
              nullptr);
    });
    correction.assign(in.H * images, 0.0f);
    for (int64_t row = 0; row < in.H * in.L; ++row) correction[row / in.sigma_block] += dots[row];
    for (float& c : correction) c *= 2.0f / static_cast<float>(in.sigma_block * in.m);
  }
  for_row_blocks(in.H, in.L, [&](int64_t h, int64_t begin, int64_t end) {
    rows_fn(in.tables[h], in.proj_rows[h].data(), in.anchor_rows[h].data(), zp + h * z0, z1, sp + h * sigmas,
            per_input ? correction.data() + h * images : nullptr, in.sigma_block, begin, end, in.m, in.d, in.b,
            gp + h * in.L * in.b, false, nullptr, gzp + h * z0);
  });
  return grad_z;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ecopvt, m) {
  m.def("kernel_hash_codes(Tensor z, Tensor anchors, Tensor projection, Tensor kernel_mean, Tensor bandwidth, "
        "int images) -> Tensor");
  m.def("kernel_hash_backward(Tensor grad, Tensor z, Tensor anchors, Tensor projection, Tensor kernel_mean, "
        "Tensor bandwidth, int images, bool per_input) -> Tensor");
}
TORCH_LIBRARY_IMPL(ecopvt, CPU, m) {
  m.impl("kernel_hash_codes", &kernel_hash_codes);
  m.impl("kernel_hash_backward", &kernel_hash_backward);
}
