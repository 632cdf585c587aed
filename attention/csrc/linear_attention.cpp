// EcoFormer's linear attention on CPU, forward and backward (attention/ecoformer.py, DESIGN §3): per image and
// head g, with S = Σ_j h_j v_jᵀ (b, d), z = Σ_j h_j (b), w_n = Σ_j v_j (paper) or v_n (own_value: the authors' code),
//
//   linear_attention(codes (H, B, N, b) ±1, values (B, N, H, d), beta, own_value)
//     -> out (B, N, H·d), S (H, B, b, d), z (H, B, b), D (H, B, N),
//   out_n = (h_nᵀS + β·w_n) / D_n,  D_n = h_nᵀz + β·N;
//
//   linear_attention_backward(grad (B, N, H·d), codes, values, out, S, z, D, beta, own_value)
//     -> grad_codes (H, B, N, b), grad_values (B, N, H·d),
//   g_num = g/D,  g_D = -Σ_d g_num ⊙ out,  g_S = Σ_n h_n g_numᵀ,
//   g_v_n = g_Sᵀh_n + β·(Σ_n g_num (paper) or g_num_n),   g_h_n = S g_num_n + g_S v_n + g_D,n z + Σ_m g_D,m h_m.
//
// Values and gradients are read in place in the (B, N, C) order of the projections around the attention (heads
// strided, last dimension contiguous) and the output and value gradient are written in it, so no head permutation
// is copied either way. Each direction is two passes: sums over the tokens of each (head, image) (over token ranges,
// then summed, so one image and head still uses every thread), then every token. float32, ATen's intra-op threads.
// ecoformer.py's _LinearAttention is the reference these kernels are tested against and the fallback where they
// cannot be built.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

namespace {

typedef float Vec __attribute__((vector_size(32)));  // 8 floats: AVX, or two SSE/NEON registers
constexpr int kLanes = 8;
constexpr int kMaxVecs = 8;  // head size up to 64
constexpr int kRows = 4;     // rows of g_S accumulated in registers per pass over the tokens (backward pass 1)

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof(v)); }

inline Vec broadcast(float x) { return Vec{x, x, x, x, x, x, x, x}; }

inline float lane_sum(const Vec& v) {
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// A (B, N, H, d) tensor's rows, d contiguous: the row of token n of group g = h·B + image is at
// base + image·s0 + n·s1 + h·s2.
struct Rows {
  const float* base;
  int64_t s0, s1, s2, B;
  const float* group(int64_t g) const { return base + (g % B) * s0 + (g / B) * s2; }
};

Rows rows_of(const at::Tensor& t, int64_t B) {
  return Rows{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2), B};
}

// Rows of S per pass over the tokens: S's R·DV accumulators, R broadcasts and the loaded values fit in 16 registers.
constexpr int summary_rows(int dv) { return dv == 1 ? 8 : dv <= 3 ? 4 : dv <= 6 ? 2 : 1; }

// Rows [k0, k0 + R) of S, accumulated over tokens [0, N).
template <int DV, int R>
void summarise_rows(const float* codes, const float* v, int64_t v_stride, int64_t N, int64_t b, int64_t k0,
                    float* summary) {
  Vec acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < DV; ++j) acc[r][j] = load(summary + ((k0 + r) * DV + j) * kLanes);
  for (int64_t n = 0; n < N; ++n) {
    const float* hn = codes + n * b + k0;
    const float* vn = v + n * v_stride;
    for (int r = 0; r < R; ++r) {
      const Vec c = broadcast(hn[r]);
      for (int j = 0; j < DV; ++j) acc[r][j] += c * load(vn + j * kLanes);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < DV; ++j) store(summary + ((k0 + r) * DV + j) * kLanes, acc[r][j]);
}

// Forward pass 1 over tokens [0, N) of one range: partial = [S (b·DV vectors), Σ_j v_j (DV), z (b floats)], in
// blocks of tokens whose values stay in the L1 cache for the b/R passes over them.
template <int DV>
void summarise(const float* codes, const float* v, int64_t v_stride, int64_t N, int64_t b, float* partial) {
  constexpr int R = summary_rows(DV);
  constexpr int64_t kBlock = 512 / DV;  // 16 KiB of values
  float* value_sum = partial + b * DV * kLanes;
  float* code_sum = value_sum + DV * kLanes;
  std::fill(partial, code_sum + b, 0.0f);
  Vec vsum[DV] = {};
  for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
    const int64_t tokens = std::min(kBlock, N - n0);
    const float* hb = codes + n0 * b;
    const float* vb = v + n0 * v_stride;
    int64_t k0 = 0;
    for (; k0 + R <= b; k0 += R) summarise_rows<DV, R>(hb, vb, v_stride, tokens, b, k0, partial);
    for (; k0 < b; ++k0) summarise_rows<DV, 1>(hb, vb, v_stride, tokens, b, k0, partial);
    for (int64_t n = 0; n < tokens; ++n) {
      for (int j = 0; j < DV; ++j) vsum[j] += load(vb + n * v_stride + j * kLanes);
      for (int64_t k = 0; k < b; ++k) code_sum[k] += hb[n * b + k];
    }
  }
  for (int j = 0; j < DV; ++j) store(value_sum + j * kLanes, vsum[j]);
}

// out_n and D_n of the T tokens from n: T·DV independent accumulator chains, each row of S loaded once for all T.
template <int DV, int T>
inline void attend_tokens(const float* codes, const float* v, int64_t v_stride, const float* sums, float base,
                          int64_t b, float beta, bool own_value, int64_t n, float* out, int64_t out_stride,
                          float* denominators) {
  const float* value_sum = sums + b * DV * kLanes;
  const float* code_sum = value_sum + DV * kLanes;
  Vec acc[T][DV];
  float denominator[T];
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < DV; ++j)
      acc[t][j] = beta * load((own_value ? v + (n + t) * v_stride : value_sum) + j * kLanes);
    denominator[t] = base;
  }
  for (int64_t k = 0; k < b; ++k) {
    Vec row[DV];
    for (int j = 0; j < DV; ++j) row[j] = load(sums + (k * DV + j) * kLanes);
    for (int t = 0; t < T; ++t) {
      const float c = codes[(n + t) * b + k];
      for (int j = 0; j < DV; ++j) acc[t][j] += broadcast(c) * row[j];
      denominator[t] += c * code_sum[k];
    }
  }
  for (int t = 0; t < T; ++t) {
    const float inv = 1.0f / denominator[t];
    for (int j = 0; j < DV; ++j) store(out + (n + t) * out_stride + j * kLanes, acc[t][j] * inv);
    denominators[n + t] = denominator[t];
  }
}

// Forward pass 2 over tokens [begin, end) of one group: out_n and D_n, two tokens at a time up to d = 32.
template <int DV>
void attend(const float* codes, const float* v, int64_t v_stride, const float* sums, int64_t N, int64_t b,
            float beta, bool own_value, int64_t begin, int64_t end, float* out, int64_t out_stride,
            float* denominators) {
  constexpr int T = DV <= 4 ? 2 : 1;
  const float base = beta * static_cast<float>(N);
  int64_t n = begin;
  for (; n + T <= end; n += T)
    attend_tokens<DV, T>(codes, v, v_stride, sums, base, b, beta, own_value, n, out, out_stride, denominators);
  for (; n < end; ++n)
    attend_tokens<DV, 1>(codes, v, v_stride, sums, base, b, beta, own_value, n, out, out_stride, denominators);
}

// Backward pass 1 over tokens [0, N) of one range: partial = [g_S (b·DV vectors), Σ_n g_num (DV),
// Σ_n g_D,n h_n (b floats)]; g_D of every token into grad_den.
template <int DV>
void summarise_grad(const float* codes, const float* g, int64_t g_stride, const float* out, int64_t out_stride,
                    const float* denominators, int64_t N, int64_t b, float* partial, float* grad_den) {
  float* grad_sum = partial + b * DV * kLanes;
  float* weighted_codes = grad_sum + DV * kLanes;
  for (int64_t k0 = 0; k0 < b; k0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, b - k0));
    Vec acc[kRows][DV] = {};
    Vec gsum[DV] = {};
    float hsum[kRows] = {};
    for (int64_t n = 0; n < N; ++n) {
      const float* hn = codes + n * b + k0;
      const float inv = 1.0f / denominators[n];
      Vec gn[DV];
      for (int j = 0; j < DV; ++j) gn[j] = load(g + n * g_stride + j * kLanes) * inv;
      if (k0 == 0) {
        Vec dot{};
        for (int j = 0; j < DV; ++j) {
          dot += gn[j] * load(out + n * out_stride + j * kLanes);
          gsum[j] += gn[j];
        }
        grad_den[n] = -lane_sum(dot);
      }
      const float gd = grad_den[n];
      for (int r = 0; r < kRows; ++r) {
        const float c = r < rows ? hn[r] : 0.0f;
        for (int j = 0; j < DV; ++j) acc[r][j] += c * gn[j];
        hsum[r] += c * gd;
      }
    }
    for (int r = 0; r < rows; ++r) {
      for (int j = 0; j < DV; ++j) store(partial + ((k0 + r) * DV + j) * kLanes, acc[r][j]);
      weighted_codes[k0 + r] = hsum[r];
    }
    if (k0 == 0)
      for (int j = 0; j < DV; ++j) store(grad_sum + j * kLanes, gsum[j]);
  }
}

// Backward pass 2 over tokens [begin, end) of one group: g_v_n (DV vectors) and g_h_n (b of BV vectors, from the
// tables T = [Sᵀ, g_Sᵀ, z, Σ_m g_D,m h_m]: 2·d + 2 rows of BV vectors, bits zero-padded).
template <int DV, int BV>
void attend_grad(const float* codes, const float* v, int64_t v_stride, const float* g, int64_t g_stride,
                 const float* denominators, const float* grad_den, const Vec* tables, const float* grad_sums,
                 int64_t b, float beta, bool own_value, int64_t begin, int64_t end, float* grad_codes,
                 float* grad_values, int64_t gv_stride) {
  constexpr int d = DV * kLanes;
  const float* grad_sum = grad_sums + b * d;
  const Vec* summary_t = tables;
  const Vec* grad_summary_t = tables + d * BV;
  const Vec* code_sum = grad_summary_t + d * BV;
  const Vec* weighted_codes = code_sum + BV;
  for (int64_t n = begin; n < end; ++n) {
    const float* hn = codes + n * b;
    const float* vn = v + n * v_stride;
    const float inv = 1.0f / denominators[n];
    alignas(32) float gn[d];
    Vec gv[DV];
    for (int j = 0; j < DV; ++j) {
      const Vec gj = load(g + n * g_stride + j * kLanes) * inv;
      store(gn + j * kLanes, gj);
      gv[j] = beta * (own_value ? gj : load(grad_sum + j * kLanes));
    }
    for (int64_t k = 0; k < b; ++k)
      for (int j = 0; j < DV; ++j) gv[j] += hn[k] * load(grad_sums + (k * DV + j) * kLanes);
    for (int j = 0; j < DV; ++j) store(grad_values + n * gv_stride + j * kLanes, gv[j]);
    Vec gh[BV];
    for (int q = 0; q < BV; ++q) gh[q] = grad_den[n] * code_sum[q] + weighted_codes[q];
    for (int i = 0; i < d; ++i)
      for (int q = 0; q < BV; ++q) gh[q] += gn[i] * summary_t[i * BV + q] + vn[i] * grad_summary_t[i * BV + q];
    alignas(32) float row[BV * kLanes];
    for (int q = 0; q < BV; ++q) store(row + q * kLanes, gh[q]);
    std::memcpy(grad_codes + n * b, row, b * sizeof(float));
  }
}

struct Kernels {
  decltype(&summarise<1>) summarise_fn;
  decltype(&attend<1>) attend_fn;
  decltype(&summarise_grad<1>) summarise_grad_fn;
};

template <int... DV>
constexpr std::array<Kernels, sizeof...(DV)> kernel_table(std::integer_sequence<int, DV...>) {
  return {Kernels{&summarise<DV + 1>, &attend<DV + 1>, &summarise_grad<DV + 1>}...};
}

using AttendGrad = decltype(&attend_grad<1, 1>);

template <int DV, int... BV>
constexpr std::array<AttendGrad, sizeof...(BV)> attend_grad_row(std::integer_sequence<int, BV...>) {
  return {&attend_grad<DV, BV + 1>...};
}

template <int... DV>
constexpr std::array<std::array<AttendGrad, kMaxVecs>, sizeof...(DV)> attend_grad_table(
    std::integer_sequence<int, DV...>) {
  return {attend_grad_row<DV + 1>(std::make_integer_sequence<int, kMaxVecs>{})...};
}

// Runs fn(g, begin, rows, partial) for `chunks` token ranges of each of `groups` groups in parallel and returns the
// per-group sums of the `width` floats each range writes to its partial.
template <typename F>
std::vector<float> sum_over_token_ranges(int64_t groups, int64_t N, int64_t width, const F& fn) {
  const int64_t threads_per_group = (at::get_num_threads() + groups - 1) / groups;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(N / 256, threads_per_group));
  const int64_t chunk_size = (N + chunks - 1) / chunks;
  std::vector<float> partial(groups * chunks * width);
  at::parallel_for(0, groups * chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t begin = (task % chunks) * chunk_size;
      fn(task / chunks, begin, std::max<int64_t>(0, std::min(chunk_size, N - begin)), partial.data() + task * width);
    }
  });
  std::vector<float> sums(groups * width, 0.0f);
  for (int64_t task = 0; task < groups * chunks; ++task)
    for (int64_t i = 0; i < width; ++i) sums[(task / chunks) * width + i] += partial[task * width + i];
  return sums;
}

// Runs fn(g, begin, end) over blocks of 64 tokens of every group in parallel.
template <typename F>
void for_token_blocks(int64_t groups, int64_t N, const F& fn) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, groups * blocks, 4, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t begin = (task % blocks) * kBlock;
      fn(task / blocks, begin, std::min(begin + kBlock, N));
    }
  });
}

const Kernels& kernels_for(int64_t d) {
  TORCH_CHECK(d >= kLanes && d % kLanes == 0 && d <= kLanes * kMaxVecs, "linear_attention: head size ", d,
              " is not a multiple of 8 from 8 to 64");
  static constexpr auto kTable = kernel_table(std::make_integer_sequence<int, kMaxVecs>{});
  return kTable[d / kLanes - 1];
}

AttendGrad attend_grad_for(int64_t d, int64_t b) {
  TORCH_CHECK(b >= 1 && b <= kLanes * kMaxVecs, "linear_attention_backward: ", b, " bits are not from 1 to 64");
  static constexpr auto kTable = attend_grad_table(std::make_integer_sequence<int, kMaxVecs>{});
  return kTable[d / kLanes - 1][(b + kLanes - 1) / kLanes - 1];
}

// The (B, N, H, d) view of a (B, N, H·d) tensor, float32 with a contiguous last dimension.
at::Tensor heads_view(const at::Tensor& t, int64_t H, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "linear_attention: ", name, " must be float32");
  const at::Tensor rows = t.dim() == 3 ? t.unflatten(2, {H, t.size(2) / H}) : t;
  return rows.stride(3) == 1 ? rows : rows.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention(const at::Tensor& codes_in,
                                                                            const at::Tensor& values_in,
                                                                            double beta, bool own_value) {
  TORCH_CHECK(codes_in.dim() == 4 && values_in.dim() == 4, "linear_attention: expected codes (H, B, N, b) and ",
              "values (B, N, H, d), got ", codes_in.sizes(), " and ", values_in.sizes());
  const int64_t H = codes_in.size(0), B = codes_in.size(1), N = codes_in.size(2), b = codes_in.size(3);
  const int64_t d = values_in.size(3);
  TORCH_CHECK(values_in.size(0) == B && values_in.size(1) == N && values_in.size(2) == H,
              "linear_attention: values ", values_in.sizes(), " do not match codes ", codes_in.sizes());
  TORCH_CHECK(codes_in.scalar_type() == at::kFloat, "linear_attention: codes must be float32");
  const Kernels& fns = kernels_for(d);
  const at::Tensor codes = codes_in.contiguous(), values = heads_view(values_in, H, "values");
  const float* cp = codes.data_ptr<float>();
  const Rows v = rows_of(values, B);
  const int64_t groups = H * B, width = b * d + d + b;  // [S, Σ_j v_j, z] per group

  const std::vector<float> sums = sum_over_token_ranges(groups, N, width, [&](int64_t g, int64_t begin, int64_t rows,
                                                                              float* partial) {
    fns.summarise_fn(cp + (g * N + begin) * b, v.group(g) + begin * v.s1, v.s1, rows, b, partial);
  });
  const auto options = values.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({B, N, H * d}, options), denominator = at::empty({H, B, N}, options);
  float* op = out.data_ptr<float>();
  float* dp = denominator.data_ptr<float>();
  for_token_blocks(groups, N, [&](int64_t g, int64_t begin, int64_t end) {
    fns.attend_fn(cp + g * N * b, v.group(g), v.s1, sums.data() + g * width, N, b, static_cast<float>(beta),
                  own_value, begin, end, op + (g % B) * N * H * d + (g / B) * d, H * d, dp + g * N);
  });
  at::Tensor summary = at::empty({H, B, b, d}, options), code_sum = at::empty({H, B, b}, options);
  for (int64_t g = 0; g < groups; ++g) {
    std::memcpy(summary.data_ptr<float>() + g * b * d, sums.data() + g * width, b * d * sizeof(float));
    std::memcpy(code_sum.data_ptr<float>() + g * b, sums.data() + g * width + b * d + d, b * sizeof(float));
  }
  return {out, summary, code_sum, denominator};
}

std::tuple<at::Tensor, at::Tensor> linear_attention_backward(const at::Tensor& grad_in, const at::Tensor& codes_in,
                                                             const at::Tensor& values_in, const at::Tensor& out_in,
                                                             const at::Tensor& summary_in,
                                                             const at::Tensor& code_sum_in,
                                                             const at::Tensor& denominator_in, double beta,
                                                             bool own_value) {
  TORCH_CHECK(codes_in.dim() == 4 && values_in.dim() == 4, "linear_attention_backward: expected codes (H, B, N, b) ",
              "and values (B, N, H, d), got ", codes_in.sizes(), " and ", values_in.sizes());
  const int64_t H = codes_in.size(0), B = codes_in.size(1), N = codes_in.size(2), b = codes_in.size(3);
  const int64_t d = values_in.size(3);
  TORCH_CHECK(grad_in.sizes() == out_in.sizes() && out_in.dim() == 3 && out_in.size(0) == B && out_in.size(1) == N &&
                  out_in.size(2) == H * d,
              "linear_attention_backward: grad ", grad_in.sizes(), " and out ", out_in.sizes(), " must be (", B,
              ", ", N, ", ", H * d, ")");
  const Kernels& fns = kernels_for(d);
  const at::Tensor codes = codes_in.contiguous(), values = heads_view(values_in, H, "values");
  const at::Tensor grad = heads_view(grad_in, H, "grad"), out = heads_view(out_in, H, "out");
  const at::Tensor summary = summary_in.contiguous(), code_sum = code_sum_in.contiguous();
  const at::Tensor denominator = denominator_in.contiguous();
  const float* cp = codes.data_ptr<float>();
  const float* sp = summary.data_ptr<float>();
  const float* zp = code_sum.data_ptr<float>();
  const float* dp = denominator.data_ptr<float>();
  const Rows v = rows_of(values, B), g_rows = rows_of(grad, B), o = rows_of(out, B);
  const int64_t groups = H * B, width = b * d + d + b;  // [g_S, Σ_n g_num, Σ_n g_D,n h_n] per group
  std::vector<float> grad_den(groups * N);

  const std::vector<float> sums = sum_over_token_ranges(groups, N, width, [&](int64_t g, int64_t begin, int64_t rows,
                                                                              float* partial) {
    fns.summarise_grad_fn(cp + (g * N + begin) * b, g_rows.group(g) + begin * g_rows.s1, g_rows.s1,
                          o.group(g) + begin * o.s1, o.s1, dp + g * N + begin, rows, b, partial,
                          grad_den.data() + g * N + begin);
  });
  // Per group, the tables of pass 2: Sᵀ and g_Sᵀ (d rows of BV vectors), z and Σ_m g_D,m h_m (BV vectors each).
  const AttendGrad attend_grad_fn = attend_grad_for(d, b);
  const int64_t bv = (b + kLanes - 1) / kLanes, table_size = (2 * d + 2) * bv;
  std::vector<Vec> tables(groups * table_size, Vec{});
  for (int64_t g = 0; g < groups; ++g) {
    float* t = reinterpret_cast<float*>(tables.data() + g * table_size);
    const float* grad_sums = sums.data() + g * width;
    const int64_t row = bv * kLanes;
    for (int64_t k = 0; k < b; ++k) {
      for (int64_t i = 0; i < d; ++i) {
        t[i * row + k] = sp[(g * b + k) * d + i];
        t[(d + i) * row + k] = grad_sums[k * d + i];
      }
      t[2 * d * row + k] = zp[g * b + k];
      t[(2 * d + 1) * row + k] = grad_sums[b * d + d + k];
    }
  }
  const auto options = values.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_codes = at::empty({H, B, N, b}, options), grad_values = at::empty({B, N, H * d}, options);
  float* gcp = grad_codes.data_ptr<float>();
  float* gvp = grad_values.data_ptr<float>();
  for_token_blocks(groups, N, [&](int64_t g, int64_t begin, int64_t end) {
    attend_grad_fn(cp + g * N * b, v.group(g), v.s1, g_rows.group(g), g_rows.s1, dp + g * N, grad_den.data() + g * N,
                   tables.data() + g * table_size, sums.data() + g * width, b, static_cast<float>(beta), own_value,
                   begin, end, gcp + g * N * b, gvp + (g % B) * N * H * d + (g / B) * d, H * d);
  });
  return {grad_codes, grad_values};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ecopvt, m) {
  m.def("linear_attention(Tensor codes, Tensor values, float beta, bool own_value) -> "
        "(Tensor out, Tensor summary, Tensor code_sum, Tensor denominator)");
  m.def("linear_attention_backward(Tensor grad, Tensor codes, Tensor values, Tensor out, Tensor summary, "
        "Tensor code_sum, Tensor denominator, float beta, bool own_value) -> (Tensor grad_codes, Tensor grad_values)");
}
TORCH_LIBRARY_IMPL(ecopvt, CPU, m) {
  m.impl("linear_attention", &linear_attention);
  m.impl("linear_attention_backward", &linear_attention_backward);
}
