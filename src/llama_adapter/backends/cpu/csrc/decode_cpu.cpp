// CPU kernels for bf16 decoding: the blocked matrix product behind packed weights (cpu_kernels.linear) and the
// pieces of one decode step (cpu_decode.decode_step). cpu_kernels.native() builds this file with
// torch.utils.cpp_extension on first use; where it cannot, everything runs on plain PyTorch.
//
// Why: at one token per row, eager PyTorch spends ~80 small ops per layer (views, casts, RoPE, cache writes,
// two softmaxes) whose fixed cost exceeds their arithmetic, and oneDNN's bf16 product with one row reads its
// weights at about half the speed the memory allows. Each function below does the work of many such ops, with
// the same roundings as the eager path (bf16 results of fp32 arithmetic, fp32 attention; a bf16 model's cache holds
// its bf16 keys and values as they are, which the attention widens exactly).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

using bf16 = at::BFloat16;

static inline float f(bf16 x) { return static_cast<float>(x); }
static inline bf16 b(float x) { return bf16(x); }  // round to nearest even, as torch does

// Runs fn(b0, b1) over [0, n) in pieces of `piece` items, handed to threads by OpenMP's guided schedule (long runs
// of pieces first, shorter ones as the work runs out; the same thread pool as at::parallel_for). An even static
// split, as parallel_for makes, leaves every thread waiting for the slowest at the end of each of the ~120 products
// of a step; on a shared machine one thread is often late or shares its core, and a measured 20 % of the main
// thread's step went there. Handing out fixed chunks one at a time (OpenMP's dynamic schedule) fixed that but pays
// a shared counter per chunk; guided claims far fewer runs: +3 % on a bf16 step and +23 % on an int8 one (whose
// pieces are smaller) in alternating runs on this machine.
// the row-wise kernels (SwiGLU, RMSNorm) hand out about this many elements of rows a piece (a decode step's few
// rows: one piece, run on the calling thread)
constexpr int64_t kRowPiece = 16384;

template <typename F>
static void for_chunks(int64_t n, int64_t piece, const F& fn) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  piece = std::max<int64_t>(1, piece);
  const int64_t pieces = (n + piece - 1) / piece;
  if (threads <= 1 || pieces <= 1) return fn(0, n);
#pragma omp parallel for schedule(guided, 1) num_threads(static_cast<int>(std::min(threads, pieces)))
  for (int64_t c = 0; c < pieces; ++c) fn(c * piece, std::min(n, (c + 1) * piece));
}

// ---- y = x W^T: fp32 sums of bf16 products (AVX512-BF16 dot products) over a blocked weight ----------------
// The weight is stored as [ceil(N/4), K/32, 4, 32]: each group of 4 output rows is one sequential stream, which
// memory prefetchers follow at close to full speed (a row-major weight read row by row, or oneDNN's layout at one
// or two input rows, gets about 2/3 of it on the machines we measured). Input rows are taken 4 at a time, so for
// more rows a 4-row block is re-read from L1, and the weight from memory once per call.
constexpr int64_t kRows = 4, kDepth = 32;

torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(1) % kDepth == 0, "pack: [N, K % 32] bf16");
  const int64_t N = w.size(0), K = w.size(1), Np = (N + kRows - 1) / kRows * kRows;
  auto padded = Np == N ? w : torch::cat({w, torch::zeros({Np - N, K}, w.options())});
  return padded.reshape({Np / kRows, kRows, K / kDepth, kDepth}).permute({0, 2, 1, 3}).contiguous();
}

// Software prefetch, kPrefetchBytes ahead of the stream, into L2. A core's hardware prefetchers alone kept too few
// lines in flight on the Xeon (AMX, AVX512-BF16) we measured: the bf16 product chain of a SmolLM2-135M step read
// at 21 GB/s with 2 threads, and at 30 GB/s with this (the int8 kernel: 32 -> 37 GB/s); 4-16 KiB ahead were within
// noise of each other, 0.5-2 KiB gained less, and prefetching into L1 less again. One 64-byte line is prefetched
// for each line read, so a stream's prefetches run a fixed distance ahead of it, across block boundaries.
// The bf16 kernel's distance depends on the CPU: on the AMD EPYC (Zen 4) VM we measured, 8 KiB ahead made its
// stream slower than none at all (the SmolLM2-135M step's weights: 26.7 GB/s at 8 KiB, 34.3 with no software
// prefetch, 35.2 at 2 KiB, 34.1 at 1 KiB; medians of 150 alternations, 2 threads; decoding 88 -> 102 tok/s), so it
// takes 2 KiB on AMD CPUs and 8 KiB elsewhere. The int8 kernel's four row streams keep 8 KiB on both (on the EPYC:
// 2 KiB 0.72x, none 0.56x its decoding speed).
constexpr int64_t kPrefetchBytes = 8192;
// The int8 kernel adds, on AMD CPUs, a second prefetch of the line kInt8L1PrefetchBytes ahead into L1: on the Zen 4
// we measured, SmolLM2-135M int8 decode steps ran 6.5-8.5 % faster with it at 1-3 KiB (2 KiB best; medians of 12-14
// paired alternations in one process), where the same for the bf16 kernel made its steps 0.78-0.83x as fast.
#if defined(__x86_64__) && defined(__GNUC__)
static const bool kAmd = (__builtin_cpu_init(), __builtin_cpu_is("amd"));
#else
static const bool kAmd = false;
#endif
static const int64_t kBlockedPrefetchBytes = kAmd ? 2048 : 8192;
static const int64_t kInt8L1PrefetchBytes = kAmd ? 2048 : 0;

#if defined(__x86_64__)
// rows r0..r0+NR-1 of one block, for MB input rows starting at x (row stride K)
template <int MB, int NR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline void block_dot(
    const bf16* x, int64_t K, const __m512i* blk, int r0, const bf16* bias, bf16* y, int64_t N, int64_t n) {
  const int64_t kb = K / kDepth;
  __m512 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kb; ++k) {
    const char* ahead = reinterpret_cast<const char*>(blk + k * kRows) + kBlockedPrefetchBytes;
    for (int r = 0; r < NR; ++r) _mm_prefetch(ahead + 64 * r, _MM_HINT_T1);  // never faults, even past the end
    __m512bh wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(blk + k * kRows + r0 + r);
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const __m512i*>(x + m * K) + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  static_assert(NR == 4, "the reduction below sums four rows at once");
  for (int m = 0; m < MB; ++m) {  // 16 lanes x 4 rows -> 4 sums: fold 128-bit quarters, then within them
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(acc[m][0], acc[m][1], 0x44),
                                     _mm512_shuffle_f32x4(acc[m][0], acc[m][1], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(acc[m][2], acc[m][3], 0x44),
                                     _mm512_shuffle_f32x4(acc[m][2], acc[m][3], 0xEE));
    __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4E));
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0xB1));  // row r's sum in lane 4 r
    alignas(64) float out[16];
    _mm512_store_ps(out, q);
    for (int r = 0; r < NR; ++r) {
      const int64_t row = n + r0 + r;
      if (row < N) y[m * N + row] = b(out[4 * r] + (bias ? f(bias[row]) : 0.f));
    }
  }
}

using BlockFn = void (*)(const bf16*, int64_t, const __m512i*, int, const bf16*, bf16*, int64_t, int64_t);
static const BlockFn kBlockFns[4] = {block_dot<1, 4>, block_dot<2, 4>, block_dot<3, 4>, block_dot<4, 4>};

// ---- the same product on AVX2 + FMA (AMD Zen 2/3, Intel client CPUs without AVX-512) ------------------------
// There is no bf16 dot product there (and ATen's bf16 matmul falls back to plain loops: ~20 GFLOP/s against ~150 in
// fp32 on a 2-core Zen 3, where the blocked bf16 product of one row read 18 GB/s through F.linear). A bf16 is the top
// half of an fp32, so a 32-bit lane holding two neighbouring bf16 weights gives the even one as an fp32 by a shift
// left of 16 and the odd one by masking off the low half: two integer operations per 16 weights, then FMAs with
// the inputs widened once a call into the same order (per 16 inputs the 8 even ones, then the 8 odd ones). Each
// product is exact; a row's sums run in one fixed order, whatever rows come with it. With 16 ymm registers a block's
// 4 weight rows meet up to 2 input rows at once (block_dot_avx2).
#define AVX2_FN __attribute__((target("avx2,fma")))

// 16 bf16 at p as fp32: the 8 at even offsets (each pair's low half shifted up) and the 8 at odd ones (the low half
// masked off); the inputs and the weights are split alike, so their products meet in the same lanes
struct Bf16Pairs {
  __m256 even, odd;
  AVX2_FN explicit Bf16Pairs(const bf16* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

// n bf16 (n % 16 == 0) -> fp32 in pair order: per 16 values the 8 at even offsets, then the 8 at odd ones
AVX2_FN static void widen_pairs(const bf16* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const Bf16Pairs v(x + i);
    _mm256_storeu_ps(out + i, v.even);
    _mm256_storeu_ps(out + i + 8, v.odd);
  }
}

// the four sums of four 8-lane accumulators (lane r: the sum of a_r)
AVX2_FN static inline __m128 sum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// many input rows (a prefill) are taken this many at a time by a unit of the product's work: SmolLM2-135M's
// products at 512 rows on the 2-core Zen 3 VM, groups of 32-128 rows: 118-160 GFLOP/s as the machine's noise
// goes (78-88 on one core, its FMA peak; MKL's fp32 GEMM 76-84 there), ATen's bf16 matmul ~20
constexpr int64_t kAvx2RowGroup = 64;

// one block of 4 weight rows (blk: K / 32 x 4 rows x 32 bf16) for MB <= 2 input rows of widen_pairs' order (stride
// K), their 16 inputs at a time in registers (8 accumulators, 4 inputs, 2 weights of 16 ymm registers): 1.18x the
// same with 3 rows read from L1 at every FMA (medians of 7 in-process pairs at 27, 64 and 512 rows on the Zen 3 VM)
template <int MB>
AVX2_FN static void block_dot_avx2(const float* xw, int64_t K, const bf16* blk, const bf16* bias, bf16* y,
                                   int64_t N, int64_t n) {
  __m256 acc[MB][kRows];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < kRows; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K / kDepth; ++k) {
    const bf16* w = blk + k * kRows * kDepth;
    const char* ahead = reinterpret_cast<const char*>(w) + kBlockedPrefetchBytes;
    for (int r = 0; r < kRows; ++r) _mm_prefetch(ahead + 64 * r, _MM_HINT_T1);
    for (int h = 0; h < 2; ++h) {
      __m256 xe[MB], xo[MB];
      for (int m = 0; m < MB; ++m) {
        xe[m] = _mm256_loadu_ps(xw + m * K + kDepth * k + 16 * h);
        xo[m] = _mm256_loadu_ps(xw + m * K + kDepth * k + 16 * h + 8);
      }
      for (int r = 0; r < kRows; ++r) {
        const Bf16Pairs wv(w + kDepth * r + 16 * h);
        for (int m = 0; m < MB; ++m) {
          acc[m][r] = _mm256_fmadd_ps(wv.even, xe[m], acc[m][r]);
          acc[m][r] = _mm256_fmadd_ps(wv.odd, xo[m], acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    alignas(16) float out[4];
    _mm_store_ps(out, sum4x8(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = n + r;
      if (row < N) y[m * N + row] = b(out[r] + (bias ? f(bias[row]) : 0.f));
    }
  }
}

using Avx2BlockFn = void (*)(const float*, int64_t, const bf16*, const bf16*, bf16*, int64_t, int64_t);
static const Avx2BlockFn kAvx2BlockFns[2] = {block_dot_avx2<1>, block_dot_avx2<2>};
#endif

// the CPU's features, asked once at load time (linear runs ~120 times per decode step).
// LLAMA_ADAPTER_CPU_ISA=avx2 (or avx512: AVX-512 without its BF16 part; none: no vector kernels) caps them below
// what the CPU has, as oneDNN's ONEDNN_MAX_CPU_ISA does: the tests run the AVX2 kernels on AVX-512 CPUs that way.
static int isa_cap() {
  const char* e = std::getenv("LLAMA_ADAPTER_CPU_ISA");
  const std::string s = e ? e : "";
  return s == "none" ? 0 : s == "avx2" ? 1 : s == "avx512" ? 2 : 3;
}
static const int kIsaCap = isa_cap();

#if defined(__x86_64__)
static const bool kBf16Dot = (__builtin_cpu_init(), kIsaCap >= 3 && __builtin_cpu_supports("avx512bf16") &&
                              __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"));
#else
static const bool kBf16Dot = false;
#endif

bool has_bf16_dot() { return kBf16Dot; }

// AVX2 with FMA: the blocked and int8 products where AVX-512 is missing
#if defined(__x86_64__)
static const bool kAvx2 = (__builtin_cpu_init(), kIsaCap >= 1 && __builtin_cpu_supports("avx2") &&
                           __builtin_cpu_supports("fma"));
#else
static const bool kAvx2 = false;
#endif

// the blocked bf16 product (pack / linear): AVX512-BF16 dot products, or AVX2 FMAs
bool has_blocked_linear() { return kBf16Dot || kAvx2; }

// AVX-512 Foundation alone: the int8 product, the decode step's attention and argmax_rows
#if defined(__x86_64__)
static const bool kAvx512 = (__builtin_cpu_init(), kIsaCap >= 2 && __builtin_cpu_supports("avx512f"));
#else
static const bool kAvx512 = false;
#endif

// x [M, K] bf16 contiguous, wp = pack(w) for w [N, K], bias [N] or None -> [M, N] bf16
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t N,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(kBf16Dot || kAvx2, "linear: needs a CPU with AVX512-BF16 or AVX2");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "linear: x");
  TORCH_CHECK(wp.dim() == 4 && wp.is_contiguous() && wp.size(1) * kDepth == x.size(1) &&
                  wp.size(0) * kRows >= N && wp.size(0) * kRows < N + kRows, "linear: packed weight");
  const int64_t M = x.size(0), K = x.size(1), blocks = wp.size(0);
  auto y = torch::empty({M, N}, x.options());
  auto bc = bias.has_value() ? bias->contiguous() : torch::Tensor();
  TORCH_CHECK(!bc.defined() || (bc.numel() == N && bc.scalar_type() == at::kBFloat16), "linear: bias");
#if defined(__x86_64__)
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* bp = bc.defined() ? bc.data_ptr<bf16>() : nullptr;
  const __m512i* wbase = reinterpret_cast<const __m512i*>(wp.data_ptr<bf16>());
  bf16* yp = y.data_ptr<bf16>();
  const int64_t per_block = K / kDepth * kRows;  // 64-byte vectors per block
  if (!kBf16Dot) {
    std::unique_ptr<float[]> xw(new float[M * K]);  // the inputs in widen_pairs' order, once for every block
    const bf16* wb = wp.data_ptr<bf16>();
    for_chunks(M * K / 16, kRowPiece / 16, [&](int64_t v0, int64_t v1) {
      widen_pairs(xp + 16 * v0, 16 * (v1 - v0), xw.get() + 16 * v0);
    });
    // a unit of work: a piece of weight blocks (~128 KiB, in L2) and a group of input rows; each 2 rows' inputs
    // (in L1) meet the piece's blocks in turn. One parallel region a call (a prefill's rows in L2-sized chunks, each
    // its own region, measured the same at 512 rows on the Zen 3 VM, and waited at every chunk's end)
    const int64_t piece = std::max<int64_t>(1, 2048 / per_block), G = kAvx2RowGroup;
    const int64_t pieces = (blocks + piece - 1) / piece, groups = (M + G - 1) / G;
    for_chunks(pieces * groups, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t b0 = it / groups * piece, b1 = std::min(blocks, b0 + piece);
        const int64_t g0 = it % groups * G, g1 = std::min(M, g0 + G);
        for (int64_t m0 = g0; m0 < g1; m0 += 2) {
          const int64_t mb = std::min<int64_t>(2, g1 - m0);
          for (int64_t blk = b0; blk < b1; ++blk)
            kAvx2BlockFns[mb - 1](xw.get() + m0 * K, K, wb + blk * per_block * kDepth, bp, yp + m0 * N, N,
                                  blk * kRows);
        }
      }
    });
    return y;
  }
  for_chunks(blocks, std::max<int64_t>(1, 2048 / per_block), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        kBlockFns[mb - 1](xp + m0 * K, K, wbase + blk * per_block, 0, bp, yp + m0 * N, N, blk * kRows);
      }
  });
#endif
  return y;
}

// ---- y = (x Q^T) * scale: int8 weights with one scale per output row (torchao's Int8Tensor, read in place) ---
// Batch-1 decoding reads every weight once per token, so int8 weights halve the bytes a bf16 step reads. ATen's
// int8 weight-only product and torchao's eager one (which widens the whole weight first) are slower than the bf16
// kernel above on the machines we measured; this one streams the torchao weight as it is stored ([N, K] row-major,
// four rows at a time), widens 16 weights at a time to fp32 and multiplies by fp32 inputs: each product is exact
// (bf16 x int8), sums are fp32, and the row's scale (and bias) are applied once to the sum before rounding to bf16.
#if defined(__x86_64__)
// A block of 4 int8 weight rows from row n0 (past N the last is repeated, its results not stored), and its
// prefetches: the block's 4 rows are one contiguous stretch of 4 K bytes read 64 bytes a step, which the hardware
// prefetcher follows poorly (9 GB/s a core measured on an AMD EPYC, 29 with a prefetch two blocks ahead into L1): the
// line kPrefetchBytes ahead is prefetched into L2 each step (on the Xeon we measured, 37 GB/s vs 32 two blocks
// ahead), on AMD CPUs the one kInt8L1PrefetchBytes ahead into L1 too.
struct Int8Block {
  const int8_t* rows[4];
  const char* ahead;
  const char* near;
  Int8Block(const int8_t* q, int64_t K, int64_t N, int64_t n0)
      : ahead(reinterpret_cast<const char*>(q + n0 * K) + kPrefetchBytes),
        near(reinterpret_cast<const char*>(q + n0 * K) + kInt8L1PrefetchBytes) {
    for (int r = 0; r < 4; ++r) rows[r] = q + std::min<int64_t>(n0 + r, N - 1) * K;
  }
  // the prefetches of the step that reads inputs k .. k + 15 of the 4 rows (never faults, even past the end)
  void prefetch(int64_t k) const {
    _mm_prefetch(ahead + 4 * k, _MM_HINT_T1);
    if (kInt8L1PrefetchBytes) _mm_prefetch(near + 4 * k, _MM_HINT_T0);
  }
};

template <int MB>
__attribute__((target("avx512f"))) static inline void int8_block(const float* x, int64_t K, const int8_t* q,
                                                                 const float* scale, const float* bias, bf16* y,
                                                                 int64_t N, int64_t n0) {
  constexpr int NR = 4;
  const Int8Block w(q, K, N, n0);
  __m512 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    w.prefetch(k);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.rows[r] + k))));
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) {
      const int64_t row = n0 + r;
      if (row < N) y[m * N + row] = b(_mm512_reduce_add_ps(acc[m][r]) * scale[row] + (bias ? bias[row] : 0.f));
    }
}

using Int8BlockFn = void (*)(const float*, int64_t, const int8_t*, const float*, const float*, bf16*, int64_t,
                             int64_t);
static const Int8BlockFn kInt8Fns[4] = {int8_block<1>, int8_block<2>, int8_block<3>, int8_block<4>};

// The same on AVX2 + FMA: 8 weights at a time (vpmovsxbd, vcvtdq2ps, one FMA per input row), up to 3 input rows
// against the block's 4 weight rows (12 accumulators of 16 ymm registers), the prefetches as above.
template <int MB>
AVX2_FN static void int8_block_avx2(const float* x, int64_t K, const int8_t* q, const float* scale,
                                    const float* bias, bf16* y, int64_t N, int64_t n0) {
  constexpr int NR = 4;
  const Int8Block w(q, K, N, n0);
  __m256 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    w.prefetch(k);
    for (int h = 0; h < 16; h += 8)
      for (int r = 0; r < NR; ++r) {
        const __m256 wv = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.rows[r] + k + h))));
        for (int m = 0; m < MB; ++m) acc[m][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + h), acc[m][r]);
      }
  }
  for (int m = 0; m < MB; ++m) {
    alignas(16) float out[4];
    _mm_store_ps(out, sum4x8(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    for (int r = 0; r < NR; ++r) {
      const int64_t row = n0 + r;
      if (row < N) y[m * N + row] = b(out[r] * scale[row] + (bias ? bias[row] : 0.f));
    }
  }
}

static const Int8BlockFn kInt8Avx2Fns[3] = {int8_block_avx2<1>, int8_block_avx2<2>, int8_block_avx2<3>};

// With AVX512-BF16 (and K % 32 == 0) the weights are widened exactly to bf16 instead (every int8 is a bf16) and
// multiplied by the bf16 inputs as they are with the bf16 kernel's dot products: per 32 weights of a row two
// widenings to fp32, one rounding to bf16 pairs (exact) and one `vdpbf16ps` per input row, where the fp32 kernel
// above takes two widenings and two FMAs per input row. Up to 4 input rows widen in registers; past 4, each block of
// 4 weight rows is widened once into a per-thread scratch and every group of 4 input rows reads it from L1. Both
// sum the same products in the same order, so a row's result does not depend on how many rows came with it.
// Measured on the AMD EPYC (Zen 4) VM, a SmolLM2-135M step's products alternating with the fp32 kernel above:
// 1 row 5.56 vs 6.12 ms, 4 rows 8.53 vs 10.38, 8 rows 16.1 vs 18.3, 32 rows (a prompt) 42 vs 66.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline __m512bh int8_pairs(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);  // 32 values in order: exact (|q| <= 128 has 8 significant bits)
}

// the next 32 weights of the block's row r at input offset 32 k, with int8_block's prefetches (those of inputs
// 32 k and 32 k + 16: two lines per 32 inputs of the block's 4 rows)
struct Int8Rows : Int8Block {
  using Int8Block::Int8Block;
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline __m512bh widen(int64_t k, int r) const {
    if (r < 2) prefetch(32 * k + 16 * r);
    return int8_pairs(rows[r] + 32 * k);
  }
};

// one block of 4 weight rows for up to MB = 4 input rows (row stride K): the weights widened from `w`, or, with
// `scratch`, read from it (K / 32 * 4 vectors, as widened)
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline void int8_bf16_dots(
    const bf16* x, int64_t K, int mb, const Int8Rows& w, const __m512bh* scratch, const float* scale,
    const float* bias, bf16* y, int64_t N, int64_t n0) {
  constexpr int NR = 4;
  __m512 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K / 32; ++k) {
    __m512bh wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = scratch ? scratch[k * NR + r] : w.widen(k, r);
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const __m512i*>(x + (m < mb ? m : 0) * K) + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int m = 0; m < mb; ++m)
    for (int r = 0; r < NR; ++r) {
      const int64_t row = n0 + r;
      if (row < N) y[m * N + row] = b(_mm512_reduce_add_ps(acc[m][r]) * scale[row] + (bias ? bias[row] : 0.f));
    }
}

// rows n0..n0+3 of q for all M input rows; `scratch`: K / 32 * 4 vectors of this thread's (used past 4 rows)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void int8_bf16_block(
    const bf16* x, int64_t M, int64_t K, const int8_t* q, const float* scale, const float* bias, bf16* y, int64_t N,
    int64_t n0, __m512bh* scratch) {
  const Int8Rows w(q, K, N, n0);
  switch (M) {
    case 1: return int8_bf16_dots<1>(x, K, 1, w, nullptr, scale, bias, y, N, n0);
    case 2: return int8_bf16_dots<2>(x, K, 2, w, nullptr, scale, bias, y, N, n0);
    case 3: return int8_bf16_dots<3>(x, K, 3, w, nullptr, scale, bias, y, N, n0);
    case 4: return int8_bf16_dots<4>(x, K, 4, w, nullptr, scale, bias, y, N, n0);
    default: break;
  }
  for (int64_t k = 0; k < K / 32; ++k)
    for (int r = 0; r < 4; ++r) scratch[k * 4 + r] = w.widen(k, r);
  for (int64_t m0 = 0; m0 < M; m0 += 4)
    int8_bf16_dots<4>(x + m0 * K, K, static_cast<int>(std::min<int64_t>(4, M - m0)), w, scratch, scale, bias,
                      y + m0 * N, N, n0);
}
#endif

bool has_int8_linear() { return kAvx512 || kAvx2; }

// x [M, K] bf16 contiguous (K % 16 == 0), q [N, K] int8 contiguous, scale [N] fp32, bias [N] fp32 or None
// -> [M, N] bf16
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(kAvx512 || kAvx2, "linear_int8: needs a CPU with AVX-512 or AVX2");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.size(1) % 16 == 0,
              "linear_int8: x");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.size(1) == x.size(1),
              "linear_int8: q");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == at::kFloat && scale.is_contiguous(), "linear_int8: scale");
  auto bc = bias.has_value() ? bias->contiguous() : torch::Tensor();
  TORCH_CHECK(!bc.defined() || (bc.numel() == N && bc.scalar_type() == at::kFloat), "linear_int8: bias");
  auto y = torch::empty({M, N}, x.options());
#if defined(__x86_64__)
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  bf16* yp = y.data_ptr<bf16>();
  const int64_t blocks = (N + 3) / 4, piece = std::max<int64_t>(1, 8192 / (4 * K));
  if (kBf16Dot && K % 32 == 0) {
    const bf16* xb = x.data_ptr<bf16>();
    for_chunks(blocks, piece, [&](int64_t b0, int64_t b1) {
      // (64-byte aligned: a vector a slot)
      std::unique_ptr<__m512bh[]> scratch(M > 4 ? new __m512bh[K / 32 * 4] : nullptr);
      for (int64_t blk = b0; blk < b1; ++blk) int8_bf16_block(xb, M, K, qp, sp, bp, yp, N, blk * 4, scratch.get());
    });
    return y;
  }
  std::vector<float> xf(M * K);  // the inputs widened once here (an ATen cast per call was ~2 % of an int8 step)
  const bf16* xb = x.data_ptr<bf16>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = f(xb[i]);
  const float* xp = xf.data();
  const int64_t group = kAvx512 ? 4 : 3;  // input rows a call
  for_chunks(blocks, piece, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t m0 = 0; m0 < M; m0 += group) {
        const int64_t mb = std::min<int64_t>(group, M - m0);
        (kAvx512 ? kInt8Fns : kInt8Avx2Fns)[mb - 1](xp + m0 * K, K, qp, sp, bp, yp + m0 * N, N, blk * 4);
      }
  });
#endif
  return y;
}

// ---- RMSNorm, optionally after a residual add ------------------------------------------------------------
static void rms_row(const bf16* h, const bf16* w, bf16* out, int64_t D, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < D; ++i) ss += f(h[i]) * f(h[i]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = b(f(w[i]) * f(b(f(h[i]) * r)));
}

#if defined(__x86_64__)
// ---- AVX2 rows: RMSNorm, the residual add and the SwiGLU where AVX512-BF16 is missing -------------------------
// (a 512-token prefill of SmolLM2-135M on the 2-core Zen 3 VM spent ~70 ms in ATen's ops for these)
AVX2_FN static inline __m256 widen8(const bf16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// 8 fp32 values as bf16, rounded to nearest even as c10::BFloat16 (a NaN: its quiet NaN)
AVX2_FN static inline __m128i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

AVX2_FN static inline void store8_bf16(bf16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_bits8(v));
}

AVX2_FN static inline __m256 round8_bf16(__m256 v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16_bits8(v)), 16));
}

// rms_train_row's formula and roundings in 8 lanes (D % 8 == 0)
AVX2_FN static void rms_row_avx2(const bf16* x, const bf16* w, bf16* y, int64_t D, float eps) {
  __m256 ss = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) ss = _mm256_fmadd_ps(widen8(x + i), widen8(x + i), ss);
  const __m256 z = _mm256_setzero_ps();
  const float r = 1.f / std::sqrt(_mm_cvtss_f32(sum4x8(ss, z, z, z)) / static_cast<float>(D) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (int64_t i = 0; i < D; i += 8)
    store8_bf16(y + i, _mm256_mul_ps(widen8(w + i), round8_bf16(_mm256_mul_ps(widen8(x + i), rv))));
}

// h = x + a over n bf16 values (n % 8 == 0), each sum rounded once as ATen's add (h may be x: in place)
AVX2_FN static void add_rows_avx2(const bf16* x, const bf16* a, bf16* h, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) store8_bf16(h + i, _mm256_add_ps(widen8(x + i), widen8(a + i)));
}

// silu_mul_row (below) in 8 lanes with SLEEF's 8-wide expf, as ATen's AVX2 silu: its vectors cover runs of 32
// elements of a row (64 where the CPU has AVX-512: ATen's kernels then are its AVX-512 ones), std::exp the rest
using ExpF8 = __m256 (*)(__m256);
static const ExpF8 kSleefExp8 = reinterpret_cast<ExpF8>(dlsym(RTLD_DEFAULT, "Sleef_expf8_u10"));
static const int64_t kAtenSiluRun = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f") ? 64 : 32);

AVX2_FN static void silu_mul_row_avx2(const bf16* g, const bf16* u, bf16* out, int64_t F) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (const int64_t runs = F / kAtenSiluRun * kAtenSiluRun; i < runs; i += 8) {
    const __m256 x = widen8(g + i);
    const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, kSleefExp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    store8_bf16(out + i, _mm256_mul_ps(round8_bf16(silu), widen8(u + i)));
  }
  for (; i < F; ++i) {
    const float x = f(g[i]);
    out[i] = b(f(b(x / (1.f + std::exp(-x)))) * f(u[i]));
  }
}
#endif

// h [B, 2F] = [gate | up] -> silu(gate) * up, with the values of ATen's ops in FeedForward.forward, bit for bit.
// ATen's CPU silu on bf16 computes x / (1 + e^-x) in fp32, e^x by SLEEF's expf (1-ulp) in vectors of 16 over runs
// of 64 elements of a row and by std::exp on the rest, and rounds to bf16; its bf16 product rounds the fp32
// product. The loop below does the same, calling the SLEEF function libtorch itself exports, so one call replaces
// three ATen dispatches and two allocations a layer (~4 % of a batch-1 step); where libtorch does not export it
// (or on CPUs without AVX-512, where ATen's vectors are narrower) it takes ATen's ops.
#if defined(__x86_64__)
using ExpF16 = __m512 (*)(__m512);
static const ExpF16 kSleefExp = reinterpret_cast<ExpF16>(dlsym(RTLD_DEFAULT, "Sleef_expf16_u10"));

// 16 bf16 values widened to fp32 (exactly: a bf16 is the top half of an fp32)
__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __m512 widen16(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// 16 fp32 values rounded to bf16 (to nearest even, as c10::BFloat16) and widened back
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline void store_bf16(bf16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void silu_mul_row(const bf16* g, const bf16* u,
                                                                                        bf16* out, int64_t F) {
  const __m512 one = _mm512_set1_ps(1.f);
  int64_t i = 0;
  for (const int64_t runs = F / 64 * 64; i < runs; i += 16) {
    const __m512 x = widen16(g + i);
    const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, kSleefExp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    store_bf16(out + i, _mm512_mul_ps(round_bf16(silu), widen16(u + i)));  // silu rounded, the product rounded
  }
  for (; i < F; ++i) {
    const float x = f(g[i]);
    out[i] = b(f(b(x / (1.f + std::exp(-x)))) * f(u[i]));
  }
}
#endif

// libtorch exports SLEEF's 16-wide expf and the CPU has AVX512-BF16: what the SwiGLU, its training backward and
// the training loss's softmax need
bool has_exact_silu() {
#if defined(__x86_64__)
  return kSleefExp != nullptr && kBf16Dot;
#else
  return false;
#endif
}

// libtorch exports SLEEF's 8-wide expf and the CPU has AVX2 without AVX512-BF16: silu_mul's AVX2 rows (no backward)
bool has_silu_rows_avx2() {
#if defined(__x86_64__)
  return kSleefExp8 != nullptr && kAvx2 && !kBf16Dot;
#else
  return false;
#endif
}

torch::Tensor silu_mul(const torch::Tensor& h) {
#if defined(__x86_64__)
  // AVX512-BF16's rows, else AVX2's (each ATen's values bit for bit on such a CPU)
  const auto row = has_exact_silu() ? silu_mul_row : has_silu_rows_avx2() ? silu_mul_row_avx2 : nullptr;
  if (row != nullptr && h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kBFloat16 && h.size(1) % 2 == 0) {
    const int64_t B = h.size(0), F = h.size(1) / 2;
    auto out = torch::empty({B, F}, h.options());
    const bf16* hp = h.data_ptr<bf16>();
    bf16* op = out.data_ptr<bf16>();
    for_chunks(B, kRowPiece / F, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row(hp + r * 2 * F, hp + r * 2 * F + F, op + r * F, F);
    });
    return out;
  }
#endif
  auto parts = h.chunk(2, -1);
  return at::silu(parts[0]) * parts[1];
}

// ---- RMSNorm of bf16 training rows, forward and backward one pass each (kernels._RMSNorm) -----------------------
// forward: r = rsqrt(mean(x^2) + eps) in fp32, y = w * bf16(x r) (rounded twice, as the reference); backward (the
// weight frozen): dx = (dy w - xhat mean(dy w xhat)) r with xhat = x r, in fp32, rounded once. Autograd's graph of
// the Python version was six kernels forward and eight backward over [rows, D] temporaries.
// With a residual sum before it (kernels._AddRMSNorm: h = x + a, then the norm of h, as a block's second norm): h
// rounded once as ATen's bf16 add, in the same pass; backward adds the gradient h has from its other use (the next
// residual) to the norm's, each rounded as autograd's accumulation rounds them.
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static float rms_train_row(const bf16* x, const bf16* w,
                                                                                         bf16* y, int64_t D, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) {
    const __m512 v = widen16(x + i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const float r = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(D) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t i = 0; i < D; i += 16)
    store_bf16(y + i, _mm512_mul_ps(widen16(w + i), round_bf16(_mm512_mul_ps(widen16(x + i), rv))));
  return r;
}

// h = x + a over n bf16 values (n % 16 == 0), each sum rounded once as ATen's add (h may be x: in place)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void add_rows(const bf16* x, const bf16* a,
                                                                                     bf16* h, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) store_bf16(h + i, _mm512_add_ps(widen16(x + i), widen16(a + i)));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static float add_rms_train_row(
    const bf16* x, const bf16* a, const bf16* w, bf16* h, bf16* y, int64_t D, float eps) {
  add_rows(x, a, h, D);
  return rms_train_row(h, w, y, D, eps);
}

// dres: the gradient x has from elsewhere, added to the result (nullptr: none)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void rms_train_backward_row(
    const bf16* x, const bf16* w, float r, const bf16* dy, const bf16* dres, bf16* dx, int64_t D) {
  const __m512 rv = _mm512_set1_ps(r);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16)
    acc = _mm512_fmadd_ps(_mm512_mul_ps(widen16(dy + i), widen16(w + i)), _mm512_mul_ps(widen16(x + i), rv), acc);
  const __m512 proj = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / static_cast<float>(D));
  for (int64_t i = 0; i < D; i += 16) {
    const __m512 dxhat = _mm512_mul_ps(widen16(dy + i), widen16(w + i));
    const __m512 xhat = _mm512_mul_ps(widen16(x + i), rv);
    const __m512 g = _mm512_mul_ps(_mm512_sub_ps(dxhat, _mm512_mul_ps(xhat, proj)), rv);
    store_bf16(dx + i, dres == nullptr ? g : _mm512_add_ps(round_bf16(g), widen16(dres + i)));
  }
}
#endif

// x [B, D] bf16 -> weight * bf16(x * rsqrt(mean(x^2) + eps)): training's vector rows where they apply (the same
// formula and roundings; the sum of squares in 16 lanes), rms_row elsewhere
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16);
  auto out = torch::empty_like(x);
  const int64_t B = x.size(0), D = x.size(1);
  auto wc = w.contiguous();
  const bf16 *xp = x.data_ptr<bf16>(), *wp = wc.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  // a decode step's few rows: one piece, on the calling thread; a prefill's rows spread over the threads (512 rows
  // of SmolLM2-135M: 69 us on one thread, 30 such calls a prefill)
  for_chunks(B, kRowPiece / D, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
#if defined(__x86_64__)
      if (kBf16Dot && D % 16 == 0) {
        rms_train_row(xp + i * D, wp, op + i * D, D, (float)eps);
        continue;
      }
      if (kAvx2 && D % 8 == 0) {
        rms_row_avx2(xp + i * D, wp, op + i * D, D, (float)eps);
        continue;
      }
#endif
      rms_row(xp + i * D, wp, op + i * D, D, (float)eps);
    }
  });
  return out;
}

// h = x + a over n bf16 values, each sum rounded once as ATen's add (h may be x: in place): AVX512-BF16's vectors,
// AVX2's, or the scalar loop
static void add_bf16(const bf16* x, const bf16* a, bf16* h, int64_t n) {
  int64_t i = 0;
#if defined(__x86_64__)
  if (kBf16Dot && n % 16 == 0) add_rows(x, a, h, n), i = n;
  else if (kAvx2 && n % 8 == 0) add_rows_avx2(x, a, h, n), i = n;
#endif
  for (; i < n; ++i) h[i] = b(f(x[i]) + f(a[i]));
}

// x += y (bf16, in place, rounded once as ATen's add); returns rms_norm(x). A decode step calls this twice a layer
// (SmolLM2-135M's 60 calls: 0.27 ms a step with the scalar loops, 0.21 in vectors, timed inside the decode plan).
torch::Tensor add_rms_norm(torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && x.sizes() == y.sizes() &&
              x.scalar_type() == at::kBFloat16 && y.scalar_type() == at::kBFloat16, "add_rms_norm: x, y");
  add_bf16(x.data_ptr<bf16>(), y.data_ptr<bf16>(), x.data_ptr<bf16>(), x.numel());
  return rms_norm(x, w, eps);
}

// x, a [R, D] bf16 contiguous -> (h = x + a, rms_norm(h)): a prefill's residual sum and norm without gradients, the
// rows spread over the threads (add_rms_norm's values; x is left as it is)
std::vector<torch::Tensor> add_rms_norm_rows(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& w,
                                             double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16 && a.sizes() == x.sizes() &&
                  a.is_contiguous() && a.scalar_type() == at::kBFloat16, "add_rms_norm_rows: x, a");
  auto h = torch::empty_like(x);
  const int64_t R = x.size(0), D = x.size(1);
  const bf16 *xp = x.data_ptr<bf16>(), *ap = a.data_ptr<bf16>();
  bf16* hp = h.data_ptr<bf16>();
  for_chunks(R, kRowPiece / std::max<int64_t>(1, D), [&](int64_t r0, int64_t r1) {
    add_bf16(xp + r0 * D, ap + r0 * D, hp + r0 * D, (r1 - r0) * D);
  });
  return {h, rms_norm(h, w, eps)};
}

// x [R, D] bf16 contiguous (D % 16 == 0), w [D] bf16 -> (y [R, D] bf16, r [R] fp32)
std::vector<torch::Tensor> rms_norm_train(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(kBf16Dot, "rms_norm_train: needs AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16 && x.size(1) % 16 == 0,
              "rms_norm_train: x");
  const int64_t R = x.size(0), D = x.size(1);
  auto wc = w.contiguous();
  TORCH_CHECK(wc.numel() == D && wc.scalar_type() == at::kBFloat16, "rms_norm_train: w");
  auto y = torch::empty_like(x);
  auto r = torch::empty({R}, x.options().dtype(at::kFloat));
#if defined(__x86_64__)
  const bf16 *xp = x.data_ptr<bf16>(), *wp = wc.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  float* rp = r.data_ptr<float>();
  for_chunks(R, kRowPiece / D, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) rp[i] = rms_train_row(xp + i * D, wp, yp + i * D, D, static_cast<float>(eps));
  });
#endif
  return {y, r};
}

// x, a [R, D] bf16 contiguous (D % 16 == 0), w [D] bf16 -> (h = x + a, y = RMSNorm(h) [R, D] bf16, r [R] fp32)
std::vector<torch::Tensor> add_rms_norm_train(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& w,
                                              double eps) {
  TORCH_CHECK(kBf16Dot, "add_rms_norm_train: needs AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16 && x.size(1) % 16 == 0,
              "add_rms_norm_train: x");
  TORCH_CHECK(a.sizes() == x.sizes() && a.is_contiguous() && a.scalar_type() == at::kBFloat16, "add_rms_norm_train: a");
  const int64_t R = x.size(0), D = x.size(1);
  auto wc = w.contiguous();
  TORCH_CHECK(wc.numel() == D && wc.scalar_type() == at::kBFloat16, "add_rms_norm_train: w");
  auto h = torch::empty_like(x);
  auto y = torch::empty_like(x);
  auto r = torch::empty({R}, x.options().dtype(at::kFloat));
#if defined(__x86_64__)
  const bf16 *xp = x.data_ptr<bf16>(), *ap = a.data_ptr<bf16>(), *wp = wc.data_ptr<bf16>();
  bf16 *hp = h.data_ptr<bf16>(), *yp = y.data_ptr<bf16>();
  float* rp = r.data_ptr<float>();
  for_chunks(R, kRowPiece / D, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      rp[i] = add_rms_train_row(xp + i * D, ap + i * D, wp, hp + i * D, yp + i * D, D, static_cast<float>(eps));
  });
#endif
  return {h, y, r};
}

// the input gradient of rms_norm_train for a frozen w: x, dy [R, D] bf16, r [R] fp32 -> dx [R, D] bf16; with dres
// (x's gradient from its other use, [R, D] bf16) the sum of the two
torch::Tensor rms_norm_train_backward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& r,
                                      const torch::Tensor& dy, const c10::optional<torch::Tensor>& dres) {
  TORCH_CHECK(kBf16Dot, "rms_norm_train_backward: needs AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16 && x.size(1) % 16 == 0,
              "rms_norm_train_backward: x");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == at::kBFloat16,
              "rms_norm_train_backward: dy");
  const int64_t R = x.size(0), D = x.size(1);
  auto wc = w.contiguous();
  auto rc = r.contiguous();
  TORCH_CHECK(wc.numel() == D && wc.scalar_type() == at::kBFloat16, "rms_norm_train_backward: w");
  TORCH_CHECK(rc.numel() == R && rc.scalar_type() == at::kFloat, "rms_norm_train_backward: r");
  if (dres.has_value())
    TORCH_CHECK(dres->sizes() == x.sizes() && dres->is_contiguous() && dres->scalar_type() == at::kBFloat16,
                "rms_norm_train_backward: dres");
  auto dx = torch::empty_like(x);
#if defined(__x86_64__)
  const bf16 *xp = x.data_ptr<bf16>(), *wp = wc.data_ptr<bf16>(), *gp = dy.data_ptr<bf16>();
  const bf16* ep = dres.has_value() ? dres->data_ptr<bf16>() : nullptr;
  const float* rp = rc.data_ptr<float>();
  bf16* dp = dx.data_ptr<bf16>();
  for_chunks(R, kRowPiece / D, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      rms_train_backward_row(xp + i * D, wp, rp[i], gp + i * D, ep == nullptr ? nullptr : ep + i * D, dp + i * D, D);
  });
#endif
  return dx;
}

// The backward of silu(gate) * up for training, one pass over a row: d_up = g silu(gate) with silu(gate) rounded
// to bf16 as the forward's product saw it, and d_gate = (g up) s (1 + gate (1 - s)), s = sigmoid(gate), in fp32 from
// the bf16 product g up, as ATen's mul and silu_backward round them (its e^x: SLEEF's expf over runs of 64, std::exp
// on the rest, as the forward). Autograd's graph for the same is five kernels and two [rows, F] temporaries.
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void silu_mul_backward_row(
    const bf16* gt, const bf16* u, const bf16* g, bf16* dgate, bf16* dup, int64_t F) {
  const __m512 one = _mm512_set1_ps(1.f);
  int64_t i = 0;
  for (const int64_t runs = F / 64 * 64; i < runs; i += 16) {
    const __m512 x = widen16(gt + i), gv = widen16(g + i);
    const __m512 d = _mm512_add_ps(one, kSleefExp(_mm512_sub_ps(_mm512_setzero_ps(), x)));  // 1 + e^-x
    const __m512 sg = _mm512_div_ps(one, d);
    store_bf16(dup + i, _mm512_mul_ps(gv, round_bf16(_mm512_div_ps(x, d))));  // g * silu(gate), as mul's backward
    const __m512 ds = round_bf16(_mm512_mul_ps(gv, widen16(u + i)));           // g * up, rounded: silu's gradient in
    store_bf16(dgate + i, _mm512_mul_ps(_mm512_mul_ps(ds, sg), _mm512_add_ps(one, _mm512_mul_ps(x, _mm512_sub_ps(one, sg)))));
  }
  for (; i < F; ++i) {
    const float x = f(gt[i]), gj = f(g[i]), d = 1.f + std::exp(-x);
    const float sg = 1.f / d;
    dup[i] = b(gj * f(b(x / d)));
    dgate[i] = b(f(b(gj * f(u[i]))) * sg * (1.f + x * (1.f - sg)));
  }
}
#endif

// h [R, 2F] (gate | up) and g [R, F] bf16 contiguous -> dh [R, 2F] (d_gate | d_up); needs has_exact_silu()
torch::Tensor silu_mul_backward(const torch::Tensor& h, const torch::Tensor& g) {
  TORCH_CHECK(has_exact_silu(), "silu_mul_backward: needs AVX512-BF16 and libtorch's SLEEF");
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kBFloat16 && h.size(1) % 2 == 0,
              "silu_mul_backward: h");
  const int64_t R = h.size(0), F = h.size(1) / 2;
  TORCH_CHECK(g.dim() == 2 && g.is_contiguous() && g.scalar_type() == at::kBFloat16 && g.size(0) == R &&
                  g.size(1) == F, "silu_mul_backward: g");
  auto dh = torch::empty_like(h);
#if defined(__x86_64__)
  const bf16* hp = h.data_ptr<bf16>();
  const bf16* gp = g.data_ptr<bf16>();
  bf16* dp = dh.data_ptr<bf16>();
  for_chunks(R, kRowPiece / F, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      silu_mul_backward_row(hp + r * 2 * F, hp + r * 2 * F + F, gp + r * F, dp + r * 2 * F, dp + r * 2 * F + F, F);
  });
#endif
  return dh;
}

// ---- the training loss's softmax: cross-entropy and its logits gradient, in place, one row at a time -------
// The loss (training/loss.py) takes bf16 logits of 256 rows x vocab at a time; in ATen ops the fp32 softmax and its
// gradient are seven passes over a 50 MB buffer (widen, max, subtract, exp, sum, divide, narrow). Here a row
// (98 KB at a 49152 vocab) is read from memory once and stays in L2 for the next two passes: max, then the sum of
// e^(x - max) (SLEEF's expf, as ATen's exp), then softmax - onehot written back over the logits in bf16. Returns
// each row's loss, max + log(sum) - logit of the target, in fp32.
#if defined(__x86_64__)
// e: V floats of scratch, where the exponentials wait for the sum (each computed once: the pass is bound by them)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static float ce_row(bf16* x, int64_t V, int64_t y,
                                                                                   float* e) {
  const float picked = f(x[y]);
  const int64_t vec = V / 16 * 16;
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < vec; i += 16) mv = _mm512_max_ps(mv, widen16(x + i));
  float m = _mm512_reduce_max_ps(mv);
  for (int64_t i = vec; i < V; ++i) m = std::max(m, f(x[i]));
  const __m512 mb = _mm512_set1_ps(m);
  __m512 sv = _mm512_setzero_ps();
  for (int64_t i = 0; i < vec; i += 16) {
    const __m512 ex = kSleefExp(_mm512_sub_ps(widen16(x + i), mb));
    _mm512_storeu_ps(e + i, ex);
    sv = _mm512_add_ps(sv, ex);
  }
  float z = _mm512_reduce_add_ps(sv);
  for (int64_t i = vec; i < V; ++i) z += (e[i] = std::exp(f(x[i]) - m));
  const __m512 inv = _mm512_set1_ps(1.f / z);
  for (int64_t i = 0; i < vec; i += 16) store_bf16(x + i, _mm512_mul_ps(_mm512_loadu_ps(e + i), inv));
  for (int64_t i = vec; i < V; ++i) x[i] = b(e[i] / z);
  x[y] = b(f(x[y]) - 1.f);
  return m + std::log(z) - picked;
}
#endif

// logits [n, V] bf16 contiguous (overwritten with softmax - onehot), target [n] int64 in [0, V) -> loss [n] fp32
torch::Tensor cross_entropy_grad_(torch::Tensor& logits, const torch::Tensor& target) {
  TORCH_CHECK(has_exact_silu(), "cross_entropy_grad_: needs AVX512-BF16 and libtorch's SLEEF");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kBFloat16,
              "cross_entropy_grad_: logits");
  const int64_t n = logits.size(0), V = logits.size(1);
  auto t = target.contiguous();
  TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == n, "cross_entropy_grad_: target");
  TORCH_CHECK(n == 0 || (t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < V),
              "cross_entropy_grad_: target out of range");
  auto loss = torch::empty({n}, logits.options().dtype(at::kFloat));
#if defined(__x86_64__)
  bf16* lp = logits.data_ptr<bf16>();
  const int64_t* tp = t.data_ptr<int64_t>();
  float* out = loss.data_ptr<float>();
  for_chunks(n, 1, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> e;
    if (static_cast<int64_t>(e.size()) < V) e.resize(V);
    for (int64_t r = r0; r < r1; ++r) out[r] = ce_row(lp + r * V, V, tp[r], e.data());
  });
#endif
  return loss;
}

// ---- causal attention while training: the softmax between the two batched products, and its backward ----------
// Training takes the frozen base's causal attention as two AMX products (bf16 scores = q k^T, then P v) around a
// softmax. In ATen the scores go through a baddbmm that first copies a [rows, T] causal bias, a bf16 softmax and
// its backward: ~5 ms a layer at 4 x 256 tokens, more than the products. Here one pass per row, in place: the scale,
// the causal mask implied by the row's position (query heads of a key/value group stacked: row r is position
// r % T), fp32 max / sum with SLEEF's expf, bf16 probabilities with zeros above the diagonal; and backward
// dS = scale * P * (dP - sum(P * dP)) over the same rows.
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __m512 widen_n(const bf16* p, int64_t n) {
  const __mmask16 k = static_cast<__mmask16>((1u << n) - 1);  // the first n < 16 values, zeros after
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline void store_bf16_n(bf16* p, __m512 v,
                                                                                                  int64_t n) {
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), (__m256i)_mm512_cvtneps_pbh(v));
}

// e^(scale s - m) of 16 scores: the softmax's exponentials, and the same again when backward remakes them
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline __m512 scaled_exp(__m512 s, __m512 sc,
                                                                                                 __m512 m) {
  return kSleefExp(_mm512_fmsub_ps(s, sc, m));
}

// s: one row of T scores, the first n (>= 1) of them allowed; e: T floats of scratch; stats (if given) <- the
// row's scaled maximum and 1 / sum, from which causal_softmax_recompute_row makes the same probabilities again
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void causal_softmax_row(
    bf16* s, int64_t n, int64_t T, float scale, float* e, float* stats = nullptr) {
  const int64_t vec = n / 16 * 16, rest = n - vec;
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < vec; i += 16) mv = _mm512_max_ps(mv, widen16(s + i));
  if (rest) mv = _mm512_mask_max_ps(mv, static_cast<__mmask16>((1u << rest) - 1), mv, widen_n(s + vec, rest));
  const __m512 sc = _mm512_set1_ps(scale), m = _mm512_set1_ps(_mm512_reduce_max_ps(mv) * scale);
  __m512 zv = _mm512_setzero_ps();
  for (int64_t i = 0; i < vec; i += 16) {
    const __m512 x = scaled_exp(widen16(s + i), sc, m);
    _mm512_storeu_ps(e + i, x);
    zv = _mm512_add_ps(zv, x);
  }
  if (rest) {
    const __mmask16 k = static_cast<__mmask16>((1u << rest) - 1);
    const __m512 x = _mm512_maskz_mov_ps(k, scaled_exp(widen_n(s + vec, rest), sc, m));
    _mm512_storeu_ps(e + vec, x);
    zv = _mm512_add_ps(zv, x);
  }
  const float inv1 = 1.f / _mm512_reduce_add_ps(zv);
  const __m512 inv = _mm512_set1_ps(inv1);
  for (int64_t i = 0; i < vec; i += 16) store_bf16(s + i, _mm512_mul_ps(_mm512_loadu_ps(e + i), inv));
  if (rest) store_bf16_n(s + vec, _mm512_mul_ps(_mm512_loadu_ps(e + vec), inv), rest);
  std::fill(s + n, s + T, bf16(0.f));
  if (stats) stats[0] = _mm512_cvtss_f32(m), stats[1] = inv1;
}

// causal_softmax_row's probabilities again, bit for bit, from the same scores and the row's stats
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void causal_softmax_recompute_row(
    bf16* s, int64_t n, int64_t T, float scale, const float* stats) {
  const int64_t vec = n / 16 * 16, rest = n - vec;
  const __m512 sc = _mm512_set1_ps(scale), m = _mm512_set1_ps(stats[0]), inv = _mm512_set1_ps(stats[1]);
  for (int64_t i = 0; i < vec; i += 16)
    store_bf16(s + i, _mm512_mul_ps(scaled_exp(widen16(s + i), sc, m), inv));
  if (rest) store_bf16_n(s + vec, _mm512_mul_ps(scaled_exp(widen_n(s + vec, rest), sc, m), inv), rest);
  std::fill(s + n, s + T, bf16(0.f));
}

// dp (overwritten with dS) and p: one row of T, the first n allowed
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void causal_softmax_backward_row(
    bf16* dp, const bf16* p, int64_t n, int64_t T, float scale) {
  const int64_t vec = n / 16 * 16, rest = n - vec;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < vec; i += 16) acc = _mm512_fmadd_ps(widen16(p + i), widen16(dp + i), acc);
  if (rest) acc = _mm512_fmadd_ps(widen_n(p + vec, rest), widen_n(dp + vec, rest), acc);
  const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc)), sc = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < vec; i += 16)
    store_bf16(dp + i, _mm512_mul_ps(_mm512_mul_ps(widen16(p + i), _mm512_sub_ps(widen16(dp + i), dot)), sc));
  if (rest) {
    const __m512 x = _mm512_mul_ps(widen_n(p + vec, rest), _mm512_sub_ps(widen_n(dp + vec, rest), dot));
    store_bf16_n(dp + vec, _mm512_mul_ps(x, sc), rest);
  }
  std::fill(dp + n, dp + T, bf16(0.f));
}
#endif

static void check_scores(const torch::Tensor& s, int64_t T, const char* what) {
  TORCH_CHECK(has_exact_silu(), what, ": needs AVX512-BF16 and libtorch's SLEEF");
  TORCH_CHECK(s.dim() == 3 && s.is_contiguous() && s.scalar_type() == at::kBFloat16 && s.size(2) == T &&
                  T > 0 && s.size(1) % T == 0,
              what, ": scores must be contiguous bf16 [groups, heads x T, T]");
}

// s [G, rep * T, T] bf16 scores of query heads stacked per key/value group -> causal softmax(scale * s), in place
void causal_softmax_(torch::Tensor& s, int64_t T, double scale) {
  check_scores(s, T, "causal_softmax_");
#if defined(__x86_64__)
  bf16* sp = s.data_ptr<bf16>();
  const float sc = static_cast<float>(scale);
  for_chunks(s.size(0) * s.size(1), kRowPiece / T, [&](int64_t r0, int64_t r1) {
    std::vector<float> e(T + 16);
    for (int64_t r = r0; r < r1; ++r) causal_softmax_row(sp + r * T, r % T + 1, T, sc, e.data());
  });
#endif
}

// dp [G, rep * T, T] (the gradient of P, overwritten with that of the scores s), p the forward's probabilities
void causal_softmax_backward_(torch::Tensor& dp, const torch::Tensor& p, int64_t T, double scale) {
  check_scores(dp, T, "causal_softmax_backward_");
  TORCH_CHECK(p.sizes() == dp.sizes() && p.is_contiguous() && p.scalar_type() == at::kBFloat16,
              "causal_softmax_backward_: probabilities");
#if defined(__x86_64__)
  bf16* gp = dp.data_ptr<bf16>();
  const bf16* pp = p.data_ptr<bf16>();
  const float sc = static_cast<float>(scale);
  for_chunks(dp.size(0) * dp.size(1), kRowPiece / T, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) causal_softmax_backward_row(gp + r * T, pp + r * T, r % T + 1, T, sc);
  });
#endif
}

// ---- the causal token attention of training, one key/value group at a time (forward and backward) -------------
// With ATen the scores, probabilities and their gradients [groups, heads x T, T] pass through memory between six
// batched products and the softmax passes, the products compute the masked half too, and at K = head_dim (64)
// oneDNN reaches ~0.6 TFLOP/s inside a training step. Here one thread does one key/value group's work at once, 16
// query rows at a time, its scores, probabilities and gradients staying in L1/L2: tile products (16 x 16 fp32 sums
// of 16 x 32 by 32 x 16 bf16) over the blocks on or below the diagonal only, around the softmax rows above.
// The probabilities are not kept for backward: the forward keeps each row's scaled maximum and 1 / sum, and
// backward makes the same bf16 probabilities again from the same scores (132 MB less a step of the benchmark, and
// no [T, T] tensor written and read back). Results are rounded to bf16 where ATen's products round them (scores,
// P, dP, dS, outputs).
// Two engines do the tile products, behind one set of passes (forward_groups, backward_groups):
// - AmxTiles: AMX tiles. Every value equals the batched products' bit for bit on the machines we checked (oneDNN
//   sums in the same order; tests/test_cpu_kernels.py compares them wherever AMX is there).
// - Avx512Tiles: the same 16 x 16 products as AVX512-BF16 dot products, one per row and pair of the summed index,
//   the 16 rows' sums in registers: CPUs with AVX512-BF16 but no AMX (AMD Zen 4, Cooper Lake). The fp32 sums run in
//   another order than oneDNN's, so values are within bf16 rounding of the batched products', not equal to them.
// Needs: AVX512-BF16 and libtorch's SLEEF (the softmax rows), head_dim 64 or 128; for AmxTiles also AMX-BF16 and
// the kernel's permission to use the tile data. Other lengths than multiples of 32 go through zero-padded copies
// of a group's keys and values and of a head's last rows.
#if defined(__x86_64__) && defined(__linux__) && defined(__has_include)  // (the tile permission is Linux's call)
#if __has_include(<amxtileintrin.h>)
#define LLAMA_ADAPTER_AMX 1
#endif
#endif

#if LLAMA_ADAPTER_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_FN __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

static bool amx_permitted() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf = d & (1u << 22);
  // Linux hands out the tile state on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), once per process
  return tile && bf && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
static const bool kAmx = kIsaCap >= 3 && amx_permitted();
#else
static const bool kAmx = false;
#endif

// the engine training's causal attention takes on this CPU: "amx", "avx512" or "" (none: ATen's batched products)
std::string fused_attention_kind() {
  if (!has_exact_silu()) return "";
  return kAmx ? "amx" : "avx512";
}

#if defined(__x86_64__)
#define TILE_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// a thread's scratch of n bf16, reused from call to call (std::vector<bf16> would zero-fill it element by element);
// release_large_scratch() at the end of a call gives back what long sequences needed (a group's [heads x T, T])
constexpr int64_t kKeptScratch = int64_t{1} << 22;  // bf16 values a slot keeps between calls (8 MiB)
constexpr int kScratchSlots = 16;
thread_local std::unique_ptr<uint16_t[]> tScratch[kScratchSlots];
thread_local int64_t tScratchSize[kScratchSlots] = {};

static bf16* scratch(int slot, int64_t n) {
  if (tScratchSize[slot] < n) tScratch[slot].reset(new uint16_t[n]), tScratchSize[slot] = n;
  return reinterpret_cast<bf16*>(tScratch[slot].get());
}

static void release_large_scratch() {
  for (int slot = 0; slot < kScratchSlots; ++slot)
    if (tScratchSize[slot] > kKeptScratch) tScratch[slot].reset(), tScratchSize[slot] = 0;
}

// 16 rows r0.. (r0 % 16 == 0) of an x [n, m] (given at x, row stride ld): their part of pack_row_pairs' layout,
// the first jn of the m / 16 column blocks only (the causal passes leave the rest of those blocks to rows further
// down)
TILE_FN static void pack_row_pairs16(const bf16* x, int64_t ld, int64_t r0, int64_t m, int64_t jn, bf16* out) {
  static const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const int64_t mb = m / 16, i = r0 / 32, q0 = (r0 % 32) / 2;
  for (int64_t j = 0; j < jn; ++j) {
    bf16* o = out + (i * mb + j) * 512 + 32 * q0;
    for (int64_t q = 0; q < 8; ++q) {
      const bf16* r = x + 2 * q * ld + 16 * j;
      const __m512i two = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)r)),
                                             _mm256_loadu_si256((const __m256i*)(r + ld)), 1);
      _mm512_storeu_si512(o + 32 * q, _mm512_permutexvar_epi16(idx, two));
    }
  }
}

// x [n, m] (row stride ld; n % 32 == 0, m % 16 == 0) -> tiles of x as the right operand (rows = the summed
// index): [n / 32][m / 16] blocks of 16 x 32 bf16, element (q, c, e) of block (i, j) = x[32 i + 2 q + e][16 j + c]
TILE_FN static void pack_row_pairs(const bf16* x, int64_t ld, int64_t n, int64_t m, bf16* out) {
  for (int64_t r0 = 0; r0 < n; r0 += 16) pack_row_pairs16(x + r0 * ld, ld, r0, m, m / 16, out);
}

// the 32-bit offsets 0, stride, ..., 15 stride: one gather's 16 rows of a matrix of stride pairs of bf16 a row
TILE_FN static inline __m512i row_offsets(int64_t stride) {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(static_cast<int>(stride)));
}

// k [T, d] -> tiles of k^T as the right operand (the summed index is d): [T / 16][d / 32] blocks, element (p, n, e)
// of block (jb, h) = k[16 jb + n][32 h + 2 p + e] (pairs of channels are 32-bit units: a 16 x 16 transpose of them)
TILE_FN static void pack_transposed(const bf16* k, int64_t T, int64_t d, bf16* out) {
  const auto* k32 = reinterpret_cast<const int*>(k);
  const int64_t H = d / 32, half = d / 2;
  const __m512i keys = row_offsets(half);
  for (int64_t jb = 0; jb < T / 16; ++jb)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t p = 0; p < 16; ++p)  // the 16 keys' channel pair 16 h + p
        _mm512_storeu_si512(out + ((jb * H + h) * 16 + p) * 32,
                            _mm512_i32gather_epi32(keys, k32 + 16 * jb * half + 16 * h + p, 4));
}

// x [n, m] (m even) -> columns 0 .. total of xt [m, ld] (total >= n, a multiple of 16), zeros after the n columns
// of x: per 16 rows and pair of columns, one gather of the rows' pairs (32-bit units) split into the two columns
TILE_FN static void transpose(const bf16* x, int64_t n, int64_t total, int64_t m, bf16* xt, int64_t ld) {
  const __m512i split = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 30, 28, 26, 24, 22,
                                         20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i rows = row_offsets(m / 2);
  for (int64_t i0 = 0; i0 < total; i0 += 16) {
    const int64_t nr = std::clamp<int64_t>(n - i0, 0, 16);
    const __mmask16 valid = static_cast<__mmask16>((1u << nr) - 1);
    for (int64_t j = 0; j < m; j += 2) {
      const __m512i got = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, rows, x + i0 * m + j, 4);
      const __m512i pairs = _mm512_permutexvar_epi16(split, got);
      _mm256_storeu_si256((__m256i*)(xt + j * ld + i0), _mm512_castsi512_si256(pairs));
      _mm256_storeu_si256((__m256i*)(xt + (j + 1) * ld + i0), _mm512_extracti64x4_epi64(pairs, 1));
    }
  }
}

// the first n rows of x [n, m] in a buffer of rows (zeros after them): the tiles' operands at a length that is
// not a multiple of theirs (reads stay inside x)
static const bf16* padded_rows(const bf16* x, int64_t n, int64_t rows, int64_t m, bf16* buf) {
  if (n == rows) return x;
  std::memcpy(buf, x, n * m * sizeof(bf16));
  std::memset(buf + n * m, 0, (rows - n) * m * sizeof(bf16));
  return buf;
}

// 16 x 16 fp32 sums (row i at cbuf + 16 i) -> bf16 rows of `out` (row stride ld), optionally plus bf16 `add` first,
// in fp32
TILE_FN static inline void store_c(const float* cbuf, bf16* out, int64_t ld, const bf16* add, int64_t ld_add) {
  for (int i = 0; i < 16; ++i) {
    __m512 v = _mm512_load_ps(cbuf + 16 * i);
    if (add) v = _mm512_add_ps(v, widen16(add + i * ld_add));
    _mm256_storeu_si256((__m256i*)(out + i * ld), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// The three products of the passes, as each engine computes them (same signatures; cbuf: 256 floats of scratch):
// scores_rows(a, kt, d, nkb, out, ld, cbuf): rows r0.. (16) of a head: out[i][16 jb + n] = a[i] . k[16 jb + n] for
//   the key blocks jb < nkb (bf16 results); a: [16, d] (row stride d), kt: pack_transposed(k)
// mix_rows(a, lda, vp, d, nkc, out, add, cbuf): 16 rows: out[i][:] (+)= a[i][0 : 32 nkc] . v[0 : 32 nkc][:] (bf16
//   results, `add` [16, d] added in fp32 first); a: row stride lda; vp: pack_row_pairs(v) with d / 16 column blocks
// key_gradient(at, xp, R, T, d, out): the gradient of a key/value head: out[16 jb + n][c] = sum over the rows r of
//   every query head with a non-zero weight on key 16 jb + n (t >= 16 jb) of at[c][r] x[r][16 jb + n], bf16
//   results: at [d, R] (the rows' values transposed), xp: pack_row_pairs(x [R, T])
#if LLAMA_ADAPTER_AMX
// every tile 16 rows x 64 bytes: A = 16 rows x 32 bf16, B = 16 pairs of rows x 16 columns x 2 bf16, C = 16 x 16 fp32
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

struct AmxTiles {
  AMX_FN static void begin() {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
    _tile_loadconfig(&c);
  }

  AMX_FN static void end() { _tile_release(); }

  AMX_FN static void scores_rows(const bf16* a, const bf16* kt, int64_t d, int64_t nkb, bf16* out, int64_t ld,
                                 float* cbuf) {
    const int64_t H = d / 32;
    _tile_loadd(2, a, d * 2);
    _tile_loadd(3, a + 32, d * 2);
    if (H == 4) {
      _tile_loadd(4, a + 64, d * 2);
      _tile_loadd(5, a + 96, d * 2);
    }
    for (int64_t jb = 0; jb < nkb; ++jb) {
      const bf16* kb = kt + jb * H * 512;
      _tile_zero(0);
      _tile_loadd(6, kb, 64);
      _tile_loadd(7, kb + 512, 64);
      _tile_dpbf16ps(0, 2, 6);
      _tile_dpbf16ps(0, 3, 7);
      if (H == 4) {
        _tile_loadd(6, kb + 1024, 64);
        _tile_loadd(7, kb + 1536, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(0, 5, 7);
      }
      _tile_stored(0, cbuf, 64);
      store_c(cbuf, out + 16 * jb, ld, nullptr, 0);
    }
  }

  AMX_FN static void mix_rows(const bf16* a, int64_t lda, const bf16* vp, int64_t d, int64_t nkc, bf16* out,
                              const bf16* add, float* cbuf) {
    const int64_t cbs = d / 16;
    for (int64_t c0 = 0; c0 < cbs; c0 += 4) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kc = 0; kc < nkc; ++kc) {
        const bf16* vb = vp + (kc * cbs + c0) * 512;
        _tile_loadd(4, a + 32 * kc, lda * 2);
        _tile_loadd(5, vb, 64);
        _tile_loadd(6, vb + 512, 64);
        _tile_loadd(7, vb + 1024, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, vb + 1536, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 4, 5);
      }
      _tile_stored(0, cbuf, 64);
      store_c(cbuf, out + 16 * c0, d, add ? add + 16 * c0 : nullptr, d);
      _tile_stored(1, cbuf, 64);
      store_c(cbuf, out + 16 * c0 + 16, d, add ? add + 16 * c0 + 16 : nullptr, d);
      _tile_stored(2, cbuf, 64);
      store_c(cbuf, out + 16 * c0 + 32, d, add ? add + 16 * c0 + 32 : nullptr, d);
      _tile_stored(3, cbuf, 64);
      store_c(cbuf, out + 16 * c0 + 48, d, add ? add + 16 * c0 + 48 : nullptr, d);
    }
  }

  AMX_FN static void key_gradient(const bf16* at, const bf16* xp, int64_t R, int64_t T, int64_t d, bf16* out) {
    const int64_t kbs = T / 16, rep = R / T;
    alignas(64) float acc[4][256];
    for (int64_t jb = 0; jb < kbs; ++jb)
      for (int64_t c0 = 0; c0 < d / 16; c0 += 4) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t h = 0; h < rep; ++h)
          for (int64_t rc = (16 * jb) / 32; rc < T / 32; ++rc) {
            const int64_t r = h * T + 32 * rc;
            _tile_loadd(4, xp + ((r / 32) * kbs + jb) * 512, 64);
            const bf16* a = at + 16 * c0 * R + r;
            _tile_loadd(5, a, R * 2);
            _tile_loadd(6, a + 16 * R, R * 2);
            _tile_loadd(7, a + 32 * R, R * 2);
            _tile_dpbf16ps(0, 5, 4);
            _tile_dpbf16ps(1, 6, 4);
            _tile_loadd(5, a + 48 * R, R * 2);
            _tile_dpbf16ps(2, 7, 4);
            _tile_dpbf16ps(3, 5, 4);
          }
        _tile_stored(0, acc[0], 64);
        _tile_stored(1, acc[1], 64);
        _tile_stored(2, acc[2], 64);
        _tile_stored(3, acc[3], 64);
        for (int64_t n = 0; n < 16; ++n)
          for (int t = 0; t < 4; ++t)
            for (int64_t i = 0; i < 16; ++i) out[(16 * jb + n) * d + 16 * (c0 + t) + i] = bf16(acc[t][16 * i + n]);
      }
  }
};
#endif

struct Avx512Tiles {
  static void begin() {}
  static void end() {}

  // c (16 rows of 16 fp32 sums) += a (16 rows x 32 bf16, contiguous: pack_rows' layout) . b (one block of the
  // packed layouts: 16 pairs of rows x 16 columns x 2 bf16): an AMX tile product as 256 AVX512-BF16 dot products,
  // each adding one row's pair of a (broadcast from memory at a fixed offset) times the block's pair of rows; the 16
  // rows' sums are independent chains, which hides the dot product's latency
  TILE_FN static inline void dot(__m512 (&c)[16], const bf16* a, const bf16* b) {
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) {
      const __m512bh bp = (__m512bh)_mm512_loadu_si512(b + 32 * p);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        int32_t pair;
        std::memcpy(&pair, a + 32 * i + 2 * p, sizeof(pair));
        c[i] = _mm512_dpbf16_ps(c[i], (__m512bh)_mm512_set1_epi32(pair), bp);
      }
    }
  }

  // 16 rows of a (row stride lda) -> n tiles of 16 rows x 32 bf16 each, contiguous (columns 32 t .. 32 t + 31 in
  // tile t): dot's left operand, whose every pair then sits at a fixed offset
  TILE_FN static void pack_rows(const bf16* a, int64_t lda, int64_t n, bf16* out) {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < 16; ++i)
        _mm512_storeu_si512(out + (16 * t + i) * 32, _mm512_loadu_si512(a + i * lda + 32 * t));
  }

  TILE_FN static inline void zero(__m512 (&c)[16]) {
    for (auto& v : c) v = _mm512_setzero_ps();
  }

  TILE_FN static inline void store(const __m512 (&c)[16], float* cbuf, bf16* out, int64_t ld, const bf16* add,
                                   int64_t ld_add) {
    for (int i = 0; i < 16; ++i) _mm512_store_ps(cbuf + 16 * i, c[i]);
    store_c(cbuf, out, ld, add, ld_add);
  }

  TILE_FN static void scores_rows(const bf16* a, const bf16* kt, int64_t d, int64_t nkb, bf16* out, int64_t ld,
                                  float* cbuf) {
    const int64_t H = d / 32;
    alignas(64) bf16 at[4 * 512];
    pack_rows(a, d, H, at);
    __m512 c[16];
    for (int64_t jb = 0; jb < nkb; ++jb) {
      zero(c);
      for (int64_t h = 0; h < H; ++h) dot(c, at + 512 * h, kt + (jb * H + h) * 512);
      store(c, cbuf, out + 16 * jb, ld, nullptr, 0);
    }
  }

  TILE_FN static void mix_rows(const bf16* a, int64_t lda, const bf16* vp, int64_t d, int64_t nkc, bf16* out,
                               const bf16* add, float* cbuf) {
    const int64_t cbs = d / 16;
    bf16* ap = scratch(12, 512 * nkc);
    pack_rows(a, lda, nkc, ap);
    __m512 c[16];
    for (int64_t cb = 0; cb < cbs; ++cb) {
      zero(c);
      for (int64_t kc = 0; kc < nkc; ++kc) dot(c, ap + 512 * kc, vp + (kc * cbs + cb) * 512);
      store(c, cbuf, out + 16 * cb, d, add ? add + 16 * cb : nullptr, d);
    }
  }

  TILE_FN static void key_gradient(const bf16* at, const bf16* xp, int64_t R, int64_t T, int64_t d, bf16* out) {
    const int64_t kbs = T / 16, rep = R / T, rcs = R / 32;
    bf16* ap = scratch(12, d * R);  // at as tiles: [d / 16][R / 32][16 x 32]
    for (int64_t cb = 0; cb < d / 16; ++cb) pack_rows(at + 16 * cb * R, R, rcs, ap + cb * rcs * 512);
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    alignas(64) float acc[256];
    __m512 c[16];
    for (int64_t jb = 0; jb < kbs; ++jb)
      for (int64_t cb = 0; cb < d / 16; ++cb) {
        zero(c);
        for (int64_t h = 0; h < rep; ++h)
          for (int64_t rc = (16 * jb) / 32; rc < T / 32; ++rc) {
            const int64_t r = h * T + 32 * rc;
            dot(c, ap + (cb * rcs + r / 32) * 512, xp + ((r / 32) * kbs + jb) * 512);
          }
        // c[i][n] is the gradient's element (key 16 jb + n, channel 16 cb + i): stored transposed, a column at a time
        for (int i = 0; i < 16; ++i) _mm512_store_ps(acc + 16 * i, c[i]);
        for (int64_t n = 0; n < 16; ++n)
          _mm256_storeu_si256((__m256i*)(out + (16 * jb + n) * d + 16 * cb),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_i32gather_ps(column, acc + n, 4)));
      }
  }
};

static void check_fused_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const std::string& kind, const char* what) {
  TORCH_CHECK(!fused_attention_kind().empty(), what, ": needs AVX512-BF16 and libtorch's SLEEF");
  TORCH_CHECK(kind == "avx512" || (kind == "amx" && kAmx), what, ": engine 'avx512', or 'amx' on a CPU with AMX-BF16");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2),
              what, ": q [G, heads x T, d], k and v [G, T, d]");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kBFloat16, what, ": contiguous bf16 tensors");
  const int64_t T = k.size(1), d = k.size(2);
  TORCH_CHECK(T > 0 && (d == 64 || d == 128) && q.size(1) % T == 0, what, ": head_dim 64 or 128");
}

// one thread's groups g0.. of fused_causal_attention: per group, per 16 rows of a head: scores (the key blocks on or
// below the diagonal), softmax rows, then the rows' outputs from the probabilities while they are in L1
template <class Tiles>
TILE_FN static void forward_groups(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* stats, int64_t R,
                                   int64_t T, int64_t d, float scale, int64_t g0, int64_t g1) {
  Tiles::begin();
  const int64_t Tp = (T + 31) / 32 * 32, rep = R / T;  // Tp: the tiles' length (keys zero-padded)
  bf16 *kt = scratch(0, Tp * d), *vpairs = scratch(1, Tp * d), *rows = scratch(2, 16 * Tp), *pad = scratch(3, Tp * d),
       *ablk = scratch(4, 16 * d), *oblk = scratch(5, 16 * d);
  std::vector<float> e(Tp + 16);
  alignas(64) float cbuf[256];
  for (int64_t g = g0; g < g1; ++g) {
    pack_transposed(padded_rows(k + g * T * d, T, Tp, d, pad), Tp, d, kt);
    pack_row_pairs(padded_rows(v + g * T * d, T, Tp, d, pad), d, Tp, d, vpairs);
    for (int64_t h = 0; h < rep; ++h)
      for (int64_t t0 = 0; t0 < T; t0 += 16) {  // 16 rows of head h (fewer at its end)
        const int64_t r = g * R + h * T + t0, nr = std::min<int64_t>(16, T - t0);
        Tiles::scores_rows(padded_rows(q + r * d, nr, 16, d, ablk), kt, d, t0 / 16 + 1, rows, Tp, cbuf);
        for (int64_t i = 0; i < nr; ++i)
          causal_softmax_row(rows + i * Tp, t0 + i + 1, Tp, scale, e.data(), stats + 2 * (r + i));
        std::memset(rows + nr * Tp, 0, (16 - nr) * Tp * sizeof(bf16));
        Tiles::mix_rows(rows, Tp, vpairs, d, (t0 + 16 + 31) / 32, nr == 16 ? out + r * d : oblk, nullptr, cbuf);
        if (nr < 16) std::memcpy(out + r * d, oblk, nr * d * sizeof(bf16));
      }
  }
  Tiles::end();
  release_large_scratch();
}

// one thread's groups of fused_causal_attention_backward: per 16 rows, dP = dO v^T (bf16), dS in place by the
// softmax backward rows, dQ = dS k (+ dq_add); then per group dK = dS^T q and dV = P^T dO (key_gradient)
template <class Tiles>
TILE_FN static void backward_groups(const bf16* go, const bf16* q, const bf16* k, const bf16* v, const float* stats,
                                    bf16* dq, const bf16* dq_add, bf16* dk, bf16* dv, int64_t R, int64_t T, int64_t d,
                                    float scale, int64_t g0, int64_t g1) {
  Tiles::begin();
  const int64_t Tp = (T + 31) / 32 * 32, rep = R / T, Rp = rep * Tp;  // the tiles' lengths (zero-padded)
  bf16 *vt = scratch(0, Tp * d), *kpairs = scratch(1, Tp * d), *dspairs = scratch(2, Rp * Tp),
       *ppairs = scratch(3, Rp * Tp), *at = scratch(4, d * Rp), *kt = scratch(5, Tp * d), *prow = scratch(6, 16 * Tp),
       *drow = scratch(7, 16 * Tp), *pad = scratch(8, Tp * d), *ablk = scratch(9, 16 * d), *oblk = scratch(10, 16 * d),
       *addblk = scratch(11, 16 * d);
  alignas(64) float cbuf[256];
  for (int64_t g = g0; g < g1; ++g) {
    const bf16 *gg = go + g * R * d, *qg = q + g * R * d;
    pack_transposed(padded_rows(v + g * T * d, T, Tp, d, pad), Tp, d, vt);
    const bf16* kp = padded_rows(k + g * T * d, T, Tp, d, pad);
    pack_transposed(kp, Tp, d, kt);
    if (dq) pack_row_pairs(kp, d, Tp, d, kpairs);
    for (int64_t h = 0; h < rep; ++h)
      for (int64_t t0 = 0; t0 < Tp; t0 += 16) {  // every block of the padded length: the pairs' zeros too
        const int64_t r = h * T + t0, nr = std::clamp<int64_t>(T - t0, 0, 16);
        const int64_t jn = std::min(Tp / 16, (t0 / 32) * 2 + 2);  // the key blocks key_gradient reads
        if (nr > 0) {
          // the forward's probabilities of these rows, made again (its scores, then its softmax with its stats)
          Tiles::scores_rows(padded_rows(qg + r * d, nr, 16, d, ablk), kt, d, t0 / 16 + 1, prow, Tp, cbuf);
          for (int64_t i = 0; i < nr; ++i)
            causal_softmax_recompute_row(prow + i * Tp, t0 + i + 1, Tp, scale, stats + 2 * (g * R + r + i));
          Tiles::scores_rows(padded_rows(gg + r * d, nr, 16, d, ablk), vt, d, t0 / 16 + 1, drow, Tp, cbuf);
          for (int64_t i = 0; i < nr; ++i)
            causal_softmax_backward_row(drow + i * Tp, prow + i * Tp, t0 + i + 1, Tp, scale);
        }
        std::memset(prow + nr * Tp, 0, (16 - nr) * Tp * sizeof(bf16));
        std::memset(drow + nr * Tp, 0, (16 - nr) * Tp * sizeof(bf16));
        if (dq && nr > 0) {
          bf16* rq = dq + (g * R + r) * d;
          const bf16* add = dq_add ? padded_rows(dq_add + (g * R + r) * d, nr, 16, d, addblk) : nullptr;
          Tiles::mix_rows(drow, Tp, kpairs, d, (t0 + 16 + 31) / 32, nr == 16 ? rq : oblk, add, cbuf);
          if (nr < 16) std::memcpy(rq, oblk, nr * d * sizeof(bf16));
        }
        // the rows' P and dS, laid out for dk and dv's tile products while they are in L1
        if (dv) pack_row_pairs16(prow, Tp, h * Tp + t0, Tp, jn, ppairs);
        if (dk) pack_row_pairs16(drow, Tp, h * Tp + t0, Tp, jn, dspairs);
      }
    // dk / dv: [T, d] of the group, through a padded buffer where T is not the tiles' length
    for (int which = 0; which < 2; ++which) {
      bf16* grad = which == 0 ? dk : dv;
      if (!grad) continue;
      const bf16* rows_of = which == 0 ? qg : gg;
      for (int64_t h = 0; h < rep; ++h) transpose(rows_of + h * T * d, T, Tp, d, at + h * Tp, Rp);
      bf16* o = T == Tp ? grad + g * T * d : pad;
      Tiles::key_gradient(at, which == 0 ? dspairs : ppairs, Rp, Tp, d, o);
      if (T != Tp) std::memcpy(grad + g * T * d, pad, T * d * sizeof(bf16));
    }
  }
  Tiles::end();
  release_large_scratch();
}
#endif

// q [G, rep x T, d], k/v [G, T, d] bf16 -> (causal softmax(scale q k^T) v [G, rep x T, d], each row's softmax
// stats [G, rep x T, 2] fp32: its scaled maximum and 1 / sum, from which backward makes the probabilities again
// instead of keeping them: [G, rep x T, T] written and read back through memory cost more than making them twice);
// kind: the engine ("amx" or "avx512", see fused_attention_kind)
std::vector<torch::Tensor> fused_causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                                                  const torch::Tensor& v, double scale, const std::string& kind) {
  check_fused_attention(q, k, v, kind, "fused_causal_attention");
#if defined(__x86_64__)
  const int64_t G = q.size(0), R = q.size(1), T = k.size(1), d = k.size(2);
  auto out = torch::empty_like(q);
  auto stats = torch::empty({G, R, 2}, q.options().dtype(at::kFloat));
  const bf16 *qp = q.data_ptr<bf16>(), *kp = k.data_ptr<bf16>(), *vp = v.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  float* st = stats.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  auto run = forward_groups<Avx512Tiles>;
#if LLAMA_ADAPTER_AMX
  if (kind == "amx") run = forward_groups<AmxTiles>;
#endif
  for_chunks(G, 1, [&](int64_t g0, int64_t g1) { run(qp, kp, vp, op, st, R, T, d, sc, g0, g1); });
  return {out, stats};
#else
  return {};
#endif
}

// the gradients of fused_causal_attention's q, k, v (each where asked) from that of its output g [G, rep x T, d]
// and its softmax stats; dq_plus, another gradient of q (overwritten), is added to dq in its product and returned
std::vector<torch::Tensor> fused_causal_attention_backward(const torch::Tensor& g, const torch::Tensor& q,
                                                           const torch::Tensor& k, const torch::Tensor& v,
                                                           const torch::Tensor& stats, double scale,
                                                           c10::optional<torch::Tensor> dq_plus, bool need_dq,
                                                           bool need_dk, bool need_dv, const std::string& kind) {
  check_fused_attention(q, k, v, kind, "fused_causal_attention_backward");
#if defined(__x86_64__)
  const int64_t G = q.size(0), R = q.size(1), T = k.size(1), d = k.size(2);
  TORCH_CHECK(g.sizes() == q.sizes() && g.is_contiguous() && g.scalar_type() == at::kBFloat16,
              "fused_causal_attention_backward: g like q");
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == G && stats.size(1) == R && stats.size(2) == 2 &&
                  stats.is_contiguous() && stats.scalar_type() == at::kFloat,
              "fused_causal_attention_backward: stats [G, rep x T, 2] fp32");
  torch::Tensor dq, dk, dv;
  if (need_dq) {
    if (dq_plus.has_value()) {
      dq = *dq_plus;
      TORCH_CHECK(dq.sizes() == q.sizes() && dq.is_contiguous() && dq.scalar_type() == at::kBFloat16,
                  "fused_causal_attention_backward: dq_plus like q");
    } else {
      dq = torch::empty_like(q);
    }
  }
  if (need_dk) dk = torch::empty_like(k);
  if (need_dv) dv = torch::empty_like(v);
  const bf16* add = need_dq && dq_plus.has_value() ? dq.data_ptr<bf16>() : nullptr;
  bf16* dqp = need_dq ? dq.data_ptr<bf16>() : nullptr;
  bf16* dkp = need_dk ? dk.data_ptr<bf16>() : nullptr;
  bf16* dvp = need_dv ? dv.data_ptr<bf16>() : nullptr;
  const bf16 *gp = g.data_ptr<bf16>(), *qp = q.data_ptr<bf16>(), *kp = k.data_ptr<bf16>(), *vp = v.data_ptr<bf16>();
  const float* st = stats.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  auto run = backward_groups<Avx512Tiles>;
#if LLAMA_ADAPTER_AMX
  if (kind == "amx") run = backward_groups<AmxTiles>;
#endif
  for_chunks(G, 1, [&](int64_t g0, int64_t g1) { run(gp, qp, kp, vp, st, dqp, add, dkp, dvp, R, T, d, sc, g0, g1); });
  return {dq, dk, dv};
#else
  return {};
#endif
}

// ---- the gated prompt attention of training (eq. 6-8), added to the token attention's output -------------------
// out = y + gate_h * softmax(scale q K_p^T) V_p for every query row, against the K prompt keys/values of the row's
// key/value group. In ATen ops this is ten small kernels (scale, two batched products, softmax, gate, add; more in
// backward) of ~0.1-0.5 ms each around a few MFLOPs; here one pass over the rows each way, in fp32 (the probabilities
// [B, H, T, K] are kept for backward), parallel over (batch row, key/value group) so that the prompt gradients sum
// without sharing. A row's K scores (and, backward, its K products g . v_j) are one vector of 16 keys per block:
// the keys are laid out in pairs of channels so that one AVX512-BF16 dot product with a broadcast pair of the query
// adds that pair's products to all 16 scores (fp32 sums of exact bf16 products), with no horizontal sums per key;
// the keys' gradients (sums over the group's rows) are accumulated in registers, 8 keys x 16 channels at a time.
// d % 16 == 0, d <= 256, K <= 64.
constexpr int64_t kMaxVec = 16;     // d / 16 vectors of a head at most (d <= 256)
constexpr int kMaxKeyBlocks = 4;    // prompts of up to 64 keys, 16 a vector
#if defined(__x86_64__)
constexpr int kPromptRows = 4;      // query rows scored together (independent chains of dot products)
constexpr int kKeysPerPass = 12;    // prompt keys whose gradients are summed over the rows at once

// prompt keys (or values) [K, d] bf16 -> [K / 16 blocks, d / 2, 16 keys, 2]: vector (block, i) holds channels
// 2i and 2i + 1 of the block's 16 keys (zeros past K)
static std::vector<bf16> channel_pairs(const bf16* k, int64_t K, int64_t d) {
  const int64_t half = d / 2;
  std::vector<bf16> out((K + 15) / 16 * half * 32, bf16(0.f));
  for (int64_t j = 0; j < K; ++j)
    for (int64_t i = 0; i < half; ++i) {
      bf16* lane = &out[((j / 16) * half + i) * 32 + (j % 16) * 2];
      lane[0] = k[j * d + 2 * i];
      lane[1] = k[j * d + 2 * i + 1];
    }
  return out;
}

static inline __mmask16 key_lanes(int64_t K, int block) {  // the lanes of a block of 16 keys that are keys
  const int64_t n = K - 16 * block;
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// s[r][16 b + j] = the dot product of row r of x [kPromptRows, d] with key 16 b + j of `pairs` (the accumulators
// stay in registers: every loop over rows and blocks is unrolled, and the sums leave through memory)
template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline void pair_dots(
    const bf16* x, int64_t d, const bf16* pairs, float (*s)[kMaxKeyBlocks * 16]) {
  const int64_t half = d / 2;
  __m512 acc[kPromptRows][NB];
#pragma GCC unroll 16
  for (int r = 0; r < kPromptRows; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t i = 0; i < half; ++i) {
    __m512bh kv[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) kv[b] = (__m512bh)_mm512_loadu_si512(pairs + (b * half + i) * 32);
#pragma GCC unroll 16
    for (int r = 0; r < kPromptRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * d + 2 * i, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], kv[b], xv);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kPromptRows; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) _mm512_store_ps(s[r] + 16 * b, acc[r][b]);
}

// rows r0.. of x as a block of kPromptRows rows: x itself, or the last few rows copied into zero-padded scratch
static inline const bf16* row_block(const bf16* x, int64_t nr, int64_t d, bf16* scratch) {
  if (nr == kPromptRows) return x;
  std::fill(scratch, scratch + kPromptRows * d, bf16(0.f));
  std::copy(x, x + nr * d, scratch);
  return scratch;
}

// out[r] = (add[r] +) sum_j w[r][j] x_j (x: K rows of d fp32; out, add: rows of d bf16) for the first nr rows of a
// block, 4 channel vectors at a time (16 independent sums)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline void weighted_rows(
    const float (*w)[kMaxKeyBlocks * 16], const float* x, int64_t K, int64_t d, int64_t nr, bf16* out,
    const bf16* add) {
  const int64_t nv = d / 16;
  for (int64_t c0 = 0; c0 < nv; c0 += 4) {
    const int64_t nc = std::min<int64_t>(4, nv - c0);
    __m512 o[kPromptRows][4];
#pragma GCC unroll 16
    for (int rr = 0; rr < kPromptRows; ++rr)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) o[rr][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < K; ++j) {
      __m512 xj[4];
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) xj[c] = c < nc ? _mm512_loadu_ps(x + j * d + (c0 + c) * 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int rr = 0; rr < kPromptRows; ++rr) {
        const __m512 wj = _mm512_set1_ps(w[rr][j]);
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) o[rr][c] = _mm512_fmadd_ps(wj, xj[c], o[rr][c]);
      }
    }
#pragma GCC unroll 16
    for (int rr = 0; rr < kPromptRows; ++rr)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        if (rr >= nr || c >= nc) continue;
        const int64_t i = rr * d + (c0 + c) * 16;
        store_bf16(out + i, add == nullptr ? o[rr][c] : _mm512_add_ps(widen16(add + i), o[rr][c]));
      }
  }
}

template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void prompt_attention_group(
    const bf16* y, const bf16* q, const bf16* pk, const bf16* pv, const float* gate, bf16* out, float* prob,
    int64_t rows, int64_t T, int64_t K, int64_t d, float scale) {
  const std::vector<bf16> kp = channel_pairs(pk, K, d);
  std::vector<float> vf(K * d);
  for (int64_t i = 0; i < K * d; ++i) vf[i] = f(pv[i]);
  alignas(64) bf16 scratch[kPromptRows * 16 * kMaxVec];
  alignas(64) float w[kPromptRows][kMaxKeyBlocks * 16];  // the rows' scores, then their gated probabilities
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t r0 = 0; r0 < rows; r0 += kPromptRows) {
    const int64_t nr = std::min<int64_t>(kPromptRows, rows - r0);
    pair_dots<NB>(row_block(q + r0 * d, nr, d, scratch), d, kp.data(), w);
    for (int64_t rr = 0; rr < nr; ++rr) {  // (a padding row keeps its zero scores; its sums are not stored)
      const int64_t r = r0 + rr;
      __m512 e[NB], m = _mm512_set1_ps(-INFINITY);
      for (int b = 0; b < NB; ++b) {
        e[b] = _mm512_mul_ps(_mm512_load_ps(w[rr] + 16 * b), sc);
        m = _mm512_mask_max_ps(m, key_lanes(K, b), m, e[b]);
      }
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
      __m512 zs = _mm512_setzero_ps();
      for (int b = 0; b < NB; ++b) {
        e[b] = _mm512_maskz_mov_ps(key_lanes(K, b), kSleefExp(_mm512_sub_ps(e[b], mx)));
        zs = _mm512_add_ps(zs, e[b]);
      }
      const float z = _mm512_reduce_add_ps(zs);
      const __m512 zv = _mm512_set1_ps(z), gz = _mm512_set1_ps(gate[r / T] / z);
      for (int b = 0; b < NB; ++b) {
        _mm512_mask_storeu_ps(prob + r * K + 16 * b, key_lanes(K, b), _mm512_div_ps(e[b], zv));
        _mm512_store_ps(w[rr] + 16 * b, _mm512_mul_ps(e[b], gz));
      }
    }
    weighted_rows(w, vf.data(), K, d, nr, out + r0 * d, y + r0 * d);  // out = y + sum_j w_j v_j
  }
}

// one group's backward: dq rows (bf16), the group's dk / dv (summed over its rows, bf16) and dgate per query head
template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void prompt_attention_group_backward(
    const bf16* g, const bf16* q, const bf16* pk, const bf16* pv, const float* gate, const float* prob, bf16* dq,
    bf16* dk, bf16* dv, float* dgate, int64_t rows, int64_t T, int64_t K, int64_t d, float scale) {
  // a row's stride in ds / pg: its NB vectors, and the zeros a last pass of kKeysPerPass keys reads past K
  const int64_t W = std::max<int64_t>(NB * 16, (K + kKeysPerPass - 1) / kKeysPerPass * kKeysPerPass);
  const int64_t nv = d / 16;
  const std::vector<bf16> vp = channel_pairs(pv, K, d);
  std::vector<float> kf(K * d);
  for (int64_t i = 0; i < K * d; ++i) kf[i] = f(pk[i]);
  // per row: d score_j (scaled back to q . k_j) and p_j gate, zeros past K
  std::vector<float> ds(rows * W, 0.f), pg(rows * W, 0.f);
  alignas(64) bf16 scratch[kPromptRows * 16 * kMaxVec];
  alignas(64) float gv[kPromptRows][kMaxKeyBlocks * 16];    // the rows' g . v_j
  alignas(64) float w[kPromptRows][kMaxKeyBlocks * 16] = {};  // their d scores (a padding row's sums are not stored)
  for (int64_t h = 0; h < rows / T; ++h) dgate[h] = 0.f;
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t r0 = 0; r0 < rows; r0 += kPromptRows) {
    const int64_t nr = std::min<int64_t>(kPromptRows, rows - r0);
    pair_dots<NB>(row_block(g + r0 * d, nr, d, scratch), d, vp.data(), gv);
    for (int64_t rr = 0; rr < nr; ++rr) {
      const int64_t r = r0 + rr;
      const __m512 gt = _mm512_set1_ps(gate[r / T]);
      __m512 p[NB], dp[NB], dgv = _mm512_setzero_ps(), pdpv = _mm512_setzero_ps();
      for (int b = 0; b < NB; ++b) {
        const __m512 gvb = _mm512_load_ps(gv[rr] + 16 * b);
        p[b] = _mm512_maskz_loadu_ps(key_lanes(K, b), prob + r * K + 16 * b);
        dgv = _mm512_fmadd_ps(p[b], gvb, dgv);  // d gate = g . sum_j p_j v_j
        dp[b] = _mm512_mul_ps(gt, gvb);         // d p_j = gate g . v_j
        pdpv = _mm512_fmadd_ps(p[b], dp[b], pdpv);
      }
      dgate[r / T] += _mm512_reduce_add_ps(dgv);
      const __m512 pdp = _mm512_set1_ps(_mm512_reduce_add_ps(pdpv));
      for (int b = 0; b < NB; ++b) {
        const __m512 dsb = _mm512_mul_ps(_mm512_mul_ps(p[b], _mm512_sub_ps(dp[b], pdp)), sc);
        _mm512_storeu_ps(&ds[r * W + 16 * b], dsb);
        _mm512_store_ps(w[rr] + 16 * b, dsb);
        _mm512_storeu_ps(&pg[r * W + 16 * b], _mm512_mul_ps(p[b], gt));
      }
    }
    weighted_rows(w, kf.data(), K, d, nr, dq + r0 * d, nullptr);  // dq = sum_j ds_j k_j
  }
  // dk_j = sum_r ds_rj q_r, dv_j = sum_r p_rj gate g_r: kKeysPerPass keys x 16 channels in registers over the rows
  for (int64_t c = 0; c < nv; ++c)
    for (int64_t j0 = 0; j0 < K; j0 += kKeysPerPass) {
      __m512 ak[kKeysPerPass], av[kKeysPerPass];
#pragma GCC unroll 16
      for (int j = 0; j < kKeysPerPass; ++j) ak[j] = av[j] = _mm512_setzero_ps();
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 x = widen16(q + r * d + c * 16), go = widen16(g + r * d + c * 16);
        const float *dsr = &ds[r * W + j0], *pgr = &pg[r * W + j0];
#pragma GCC unroll 16
        for (int j = 0; j < kKeysPerPass; ++j) {
          ak[j] = _mm512_fmadd_ps(_mm512_set1_ps(dsr[j]), x, ak[j]);
          av[j] = _mm512_fmadd_ps(_mm512_set1_ps(pgr[j]), go, av[j]);
        }
      }
#pragma GCC unroll 16
      for (int j = 0; j < kKeysPerPass; ++j) {
        if (j0 + j >= K) continue;
        store_bf16(dk + (j0 + j) * d + c * 16, ak[j]);
        store_bf16(dv + (j0 + j) * d + c * 16, av[j]);
      }
    }
}

// calls fn with the group kernels for K prompt keys (K <= 64: 1 to 4 blocks of 16)
template <typename Fn>
static void with_key_blocks(int64_t K, const Fn& fn) {
  switch ((K + 15) / 16) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    default: return fn(std::integral_constant<int, 4>{});
  }
}
#endif

static void check_prompt_attention(const torch::Tensor& q, const torch::Tensor& pk, const torch::Tensor& pv,
                                   const torch::Tensor& gate) {
  TORCH_CHECK(has_exact_silu(), "prompt_attention: needs AVX512-BF16 and libtorch's SLEEF");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.scalar_type() == at::kBFloat16, "prompt_attention: q");
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3);
  TORCH_CHECK(d % 16 == 0 && d <= 16 * kMaxVec, "prompt_attention: head_dim must be a multiple of 16, at most 256");
  for (const auto* t : {&pk, &pv})
    TORCH_CHECK(t->dim() == 4 && t->is_contiguous() && t->scalar_type() == at::kBFloat16 && t->size(0) == B &&
                    t->size(3) == d && H % t->size(1) == 0 && t->sizes() == pk.sizes(),
                "prompt_attention: prompt keys/values must be contiguous bf16 [B, n_kv, K, head_dim]");
  TORCH_CHECK(pk.size(2) >= 1 && pk.size(2) <= 16 * kMaxKeyBlocks, "prompt_attention: 1 to 64 prompt keys");
  TORCH_CHECK(gate.is_contiguous() && gate.scalar_type() == at::kFloat && gate.numel() == B * H,
              "prompt_attention: gate must be contiguous fp32 [B, H]");
}

// y + the gated prompt attention of q [B, H, T, d] (query heads h of key/value group h / (H / n_kv)), and the
// probabilities [B, H, T, K] backward needs
std::vector<torch::Tensor> prompt_attention(const torch::Tensor& y, const torch::Tensor& q, const torch::Tensor& pk,
                                            const torch::Tensor& pv, const torch::Tensor& gate, double scale) {
  check_prompt_attention(q, pk, pv, gate);
  TORCH_CHECK(y.sizes() == q.sizes() && y.is_contiguous() && y.scalar_type() == at::kBFloat16, "prompt_attention: y");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), n_kv = pk.size(1), K = pk.size(2);
  const int64_t rows = H / n_kv * T;  // a group's query rows
  auto out = torch::empty_like(y);
  auto prob = torch::empty({B, H, T, K}, q.options().dtype(at::kFloat));
#if defined(__x86_64__)
  const bf16 *yp = y.data_ptr<bf16>(), *qp = q.data_ptr<bf16>(), *kp = pk.data_ptr<bf16>(), *vp = pv.data_ptr<bf16>();
  const float* gp = gate.data_ptr<float>();
  bf16* op = out.data_ptr<bf16>();
  float* pp = prob.data_ptr<float>();
  with_key_blocks(K, [&](auto nb) {
    for_chunks(B * n_kv, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u)  // u = b * n_kv + group: its rows, heads and prompts are contiguous
        prompt_attention_group<nb()>(yp + u * rows * d, qp + u * rows * d, kp + u * K * d, vp + u * K * d,
                                     gp + u * (H / n_kv), op + u * rows * d, pp + u * rows * K, rows, T, K, d,
                                     static_cast<float>(scale));
    });
  });
#endif
  return {out, prob};
}

// gradients of prompt_attention's output g [B, H, T, d] -> dq, dk, dv, dgate (that of y is g itself)
std::vector<torch::Tensor> prompt_attention_backward(const torch::Tensor& g, const torch::Tensor& q,
                                                     const torch::Tensor& pk, const torch::Tensor& pv,
                                                     const torch::Tensor& gate, const torch::Tensor& prob,
                                                     double scale) {
  check_prompt_attention(q, pk, pv, gate);
  TORCH_CHECK(g.sizes() == q.sizes() && g.is_contiguous() && g.scalar_type() == at::kBFloat16,
              "prompt_attention_backward: g");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), n_kv = pk.size(1), K = pk.size(2);
  TORCH_CHECK(prob.is_contiguous() && prob.numel() == B * H * T * K, "prompt_attention_backward: probabilities");
  const int64_t rows = H / n_kv * T;
  auto dq = torch::empty_like(q);
  auto dk = torch::empty_like(pk);
  auto dv = torch::empty_like(pv);
  auto dgate = torch::empty_like(gate);
#if defined(__x86_64__)
  const bf16 *gp = g.data_ptr<bf16>(), *qp = q.data_ptr<bf16>(), *kp = pk.data_ptr<bf16>(), *vp = pv.data_ptr<bf16>();
  const float *tp = gate.data_ptr<float>(), *pp = prob.data_ptr<float>();
  bf16 *dqp = dq.data_ptr<bf16>(), *dkp = dk.data_ptr<bf16>(), *dvp = dv.data_ptr<bf16>();
  float* dgp = dgate.data_ptr<float>();
  with_key_blocks(K, [&](auto nb) {
    for_chunks(B * n_kv, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u)
        prompt_attention_group_backward<nb()>(gp + u * rows * d, qp + u * rows * d, kp + u * K * d,
                                              vp + u * K * d, tp + u * (H / n_kv), pp + u * rows * K,
                                              dqp + u * rows * d, dkp + u * K * d, dvp + u * K * d,
                                              dgp + u * (H / n_kv), rows, T, K, d, static_cast<float>(scale));
    });
  });
#endif
  return {dq, dk, dv, dgate};
}

// ---- rotary embedding of a training step's queries and keys, heads laid out for the attention -------------------
// qkv [B, T, (H + 2 n_kv) d] (the fused projection's output) -> q [B, H, T, d], k and v [B, n_kv, T, d], contiguous,
// q and k rotated: out = x cos + roll(x, d/2) signed_sin, with the eager path's three bf16 roundings (each product,
// then the sum), so values are bit for bit model.apply_rope's. In ATen ops this is a roll (a cat), two products and
// a sum over q and k, then copies to make the heads contiguous, each once more in backward; here one pass each way.
#if defined(__x86_64__)
// one head of d values: rotated (cs/sn: the position's cos and signed sin) or copied
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void rope_head(const bf16* x, const bf16* cs,
                                                                                      const bf16* sn, bf16* out,
                                                                                      int64_t d, bool backward) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; i += 16) {
    const __m512 lo = widen16(x + i), hi = widen16(x + h + i);
    // forward: x_lo c_lo + x_hi s_lo and x_hi c_hi + x_lo s_hi; backward (the transpose): g_lo c_lo + g_hi s_hi and
    // g_hi c_hi + g_lo s_lo
    const __m512 s_lo = widen16(sn + i), s_hi = widen16(sn + h + i);
    const __m512 a = round_bf16(_mm512_mul_ps(lo, widen16(cs + i)));
    const __m512 c = round_bf16(_mm512_mul_ps(hi, widen16(cs + h + i)));
    store_bf16(out + i, _mm512_add_ps(a, round_bf16(_mm512_mul_ps(hi, backward ? s_hi : s_lo))));
    store_bf16(out + h + i, _mm512_add_ps(c, round_bf16(_mm512_mul_ps(lo, backward ? s_lo : s_hi))));
  }
}

// rope_head in 8 lanes (CPUs with AVX2 and without AVX512-BF16): the same products, roundings and sums
AVX2_FN static void rope_head_avx2(const bf16* x, const bf16* cs, const bf16* sn, bf16* out, int64_t d, bool backward) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; i += 8) {
    const __m256 lo = widen8(x + i), hi = widen8(x + h + i);
    const __m256 s_lo = widen8(sn + i), s_hi = widen8(sn + h + i);
    const __m256 a = round8_bf16(_mm256_mul_ps(lo, widen8(cs + i)));
    const __m256 c = round8_bf16(_mm256_mul_ps(hi, widen8(cs + h + i)));
    store8_bf16(out + i, _mm256_add_ps(a, round8_bf16(_mm256_mul_ps(hi, backward ? s_hi : s_lo))));
    store8_bf16(out + h + i, _mm256_add_ps(c, round8_bf16(_mm256_mul_ps(lo, backward ? s_lo : s_hi))));
  }
}

// Between the fused projection's rows [B * T, (H + 2 n_kv) d] and the heads q [B, H, T, d], k and v [B, n_kv, T, d]:
// forward rotates each row's q and k into the heads, backward the heads' gradients into a row (rope_head's
// transpose); v is copied either way. The source is only read (`rows` of the forward is its const input).
template <bool kBackward>
static void rope_rows(bf16* rows, bf16* q, bf16* k, bf16* v, const bf16* cos, const bf16* sin, int64_t B, int64_t T,
                      int64_t H, int64_t n_kv, int64_t d) {
  const int64_t W = (H + 2 * n_kv) * d;
  for_chunks(B * T, kRowPiece / W, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / T, t = r % T;
      bf16* x = rows + r * W;
      const auto move = [&](bf16* part, bf16* head, bool rotate) {
        bf16* src = kBackward ? head : part;
        bf16* dst = kBackward ? part : head;
        if (rotate)
          (kBf16Dot ? rope_head : rope_head_avx2)(src, cos + t * d, sin + t * d, dst, d, kBackward);
        else
          std::copy(src, src + d, dst);
      };
      for (int64_t h = 0; h < H; ++h) move(x + h * d, q + ((bi * H + h) * T + t) * d, true);
      for (int64_t h = 0; h < n_kv; ++h) {
        const int64_t o = ((bi * n_kv + h) * T + t) * d;
        move(x + (H + h) * d, k + o, true);
        move(x + (H + n_kv + h) * d, v + o, false);
      }
    }
  });
}
#endif

static void check_rope(const torch::Tensor& cos, const torch::Tensor& sin, int64_t T, int64_t d) {
  TORCH_CHECK(kBf16Dot || kAvx2, "rope: needs AVX512-BF16 or AVX2");
  TORCH_CHECK(d % 32 == 0, "rope: head_dim must be a multiple of 32");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kBFloat16 && t->numel() == T * d,
                "rope: cos/sin must be contiguous bf16 [T, head_dim]");
}

std::vector<torch::Tensor> rope_qkv(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                    int64_t H, int64_t n_kv) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && qkv.scalar_type() == at::kBFloat16, "rope_qkv: qkv");
  const int64_t B = qkv.size(0), T = qkv.size(1), W = qkv.size(2), d = W / (H + 2 * n_kv);
  TORCH_CHECK(d * (H + 2 * n_kv) == W, "rope_qkv: width is not (H + 2 n_kv) x head_dim");
  check_rope(cos, sin, T, d);
  auto q = torch::empty({B, H, T, d}, qkv.options());
  auto k = torch::empty({B, n_kv, T, d}, qkv.options());
  auto v = torch::empty({B, n_kv, T, d}, qkv.options());
#if defined(__x86_64__)
  rope_rows<false>(const_cast<bf16*>(qkv.data_ptr<bf16>()), q.data_ptr<bf16>(), k.data_ptr<bf16>(), v.data_ptr<bf16>(),
                   cos.data_ptr<bf16>(), sin.data_ptr<bf16>(), B, T, H, n_kv, d);
#endif
  return {q, k, v};
}

// the gradients of rope_qkv's outputs -> that of its input qkv [B, T, (H + 2 n_kv) d]
torch::Tensor rope_qkv_backward(const torch::Tensor& dq, const torch::Tensor& dk, const torch::Tensor& dv,
                                const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t B = dq.size(0), H = dq.size(1), T = dq.size(2), d = dq.size(3), n_kv = dk.size(1);
  for (const auto* g : {&dq, &dk, &dv})
    TORCH_CHECK(g->is_contiguous() && g->scalar_type() == at::kBFloat16 && g->dim() == 4 && g->size(0) == B &&
                    g->size(2) == T && g->size(3) == d,
                "rope_qkv_backward: gradients must be contiguous bf16 [B, heads, T, head_dim]");
  TORCH_CHECK(dv.size(1) == n_kv, "rope_qkv_backward: k and v heads differ");
  check_rope(cos, sin, T, d);
  auto dx = torch::empty({B, T, (H + 2 * n_kv) * d}, dq.options());
#if defined(__x86_64__)
  rope_rows<true>(dx.data_ptr<bf16>(), const_cast<bf16*>(dq.data_ptr<bf16>()), const_cast<bf16*>(dk.data_ptr<bf16>()),
                  const_cast<bf16*>(dv.data_ptr<bf16>()), cos.data_ptr<bf16>(), sin.data_ptr<bf16>(), B, T, H, n_kv, d);
#endif
  return dx;
}

// ---- attention of one new token per row, with the gated prompt attention of zero-init adapters ------------
// Vector code for the machine it runs on, chosen at load time (one build serves AVX2 and AVX-512 CPUs).
#if defined(__x86_64__) && defined(__GNUC__)
#define VECTORIZED __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTORIZED
#endif

// A KV cache's elements: fp32, or bf16 for a bf16 model, whose keys and values are bf16 values to begin with (the
// projections' outputs, RoPE's rounded results), so the cache holds them exactly in half the bytes of fp32 and the
// attention below widens them back to the same fp32 values: the same results from either cache.
static inline float kv_float(float x) { return x; }
static inline float kv_float(bf16 x) { return f(x); }
template <typename T>
static inline T kv_store(float x) {
  return static_cast<T>(x);  // (bf16: round to nearest even, exact for a bf16 value)
}

// q . k with 16 independent partial sums, so the compiler can keep them in vector lanes
template <typename T>
static inline float dot(const float* q, const T* k, int64_t d) {
  float acc[16] = {0.f};
  int64_t t = 0;
  for (; t + 16 <= d; t += 16)
    for (int u = 0; u < 16; ++u) acc[u] += q[t + u] * kv_float(k[t + u]);
  float s = 0.f;
  for (; t < d; ++t) s += q[t] * kv_float(k[t]);
  for (int u = 0; u < 16; ++u) s += acc[u];
  return s;
}

#if defined(__x86_64__)
// scores[j] = q . k_j for n keys (row stride sk), d % 16 == 0 and d <= 256: four keys at a time, so the four
// horizontal sums share one shuffle tree (per-key sums would cost more than the products at d = 64)
// 16 of a cache's keys or values as fp32 (bf16 widened exactly)
__attribute__((target("avx512f"))) static inline __m512 kv16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) static inline __m512 kv16(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <typename T>
__attribute__((target("avx512f"))) static void scores_avx512(const float* q, const T* k, int64_t n, int64_t d,
                                                             int64_t sk, float* scores) {
  const int64_t dv = d / 16;
  __m512 qv[16];
  for (int64_t c = 0; c < dv; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m512 a[4];
    for (int r = 0; r < 4; ++r) {
      a[r] = _mm512_mul_ps(qv[0], kv16(k + (j + r) * sk));
      for (int64_t c = 1; c < dv; ++c) a[r] = _mm512_fmadd_ps(qv[c], kv16(k + (j + r) * sk + 16 * c), a[r]);
    }
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
    __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
    alignas(64) float out[16];
    _mm512_store_ps(out, t);
    for (int r = 0; r < 4; ++r) scores[j + r] = out[4 * r];
  }
  for (; j < n; ++j) {
    __m512 a = _mm512_mul_ps(qv[0], kv16(k + j * sk));
    for (int64_t c = 1; c < dv; ++c) a = _mm512_fmadd_ps(qv[c], kv16(k + j * sk + 16 * c), a);
    scores[j] = _mm512_reduce_add_ps(a);
  }
}

// e^x for x <= 0 (and -inf -> 0): 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, p a degree-6 Taylor polynomial
// (relative error < 3e-7, the size of fp32 rounding).
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
constexpr float kExpTaylor[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};  // Horner, highest first

__attribute__((target("avx512f"))) static inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // e^-104 is 0 in fp32; keeps n finite for -inf
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), 0);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);  // ln2 in two parts, exact product
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpTaylor[i]));
  return _mm512_scalef_ps(p, n);
}

// softmax(q k^T) v over n keys (mask: false = left out), d % 16 == 0 and d <= 256
template <typename T>
__attribute__((target("avx512f"))) static void softmax_attend_avx512(
    const float* __restrict q, const T* __restrict k, const T* __restrict v, int64_t n, int64_t d, int64_t sk,
    const bool* __restrict mask, float* __restrict scores, float* __restrict out) {
  scores_avx512(q, k, n, d, sk, scores);
  const float ninf = -std::numeric_limits<float>::infinity();
  if (mask)
    for (int64_t j = 0; j < n; ++j) scores[j] = mask[j] ? scores[j] : ninf;
  __m512 mv = _mm512_set1_ps(ninf);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(scores + j));
  float mx = _mm512_reduce_max_ps(mv);
  for (; j < n; ++j) mx = std::max(mx, scores[j]);
  const __m512 mxv = _mm512_set1_ps(mx);
  __m512 sv = _mm512_setzero_ps();
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), mxv));
    _mm512_storeu_ps(scores + j, e);
    sv = _mm512_add_ps(sv, e);
  }
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_mask_loadu_ps(mxv, m, scores + j), mxv));
    _mm512_mask_storeu_ps(scores + j, m, e);
    sv = _mm512_add_ps(sv, _mm512_maskz_mov_ps(m, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sv));
  const int64_t dv = d / 16;
  __m512 acc[16];
  for (int64_t c = 0; c < dv; ++c) acc[c] = _mm512_setzero_ps();
  for (j = 0; j < n; ++j) {
    const __m512 pj = _mm512_set1_ps(scores[j]);
    for (int64_t c = 0; c < dv; ++c) acc[c] = _mm512_fmadd_ps(pj, kv16(v + j * sk + 16 * c), acc[c]);
  }
  for (int64_t c = 0; c < dv; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
}

// The same on AVX2 + FMA, 8 lanes (d % 8 == 0, d <= 128): the keys' sums four at a time through sum4x8, e^x from
// the same polynomial with 2^n made in the exponent bits (x clamped at -87, where 2^n is still normal; below it,
// and at -inf, 0).
AVX2_FN static inline __m256 kv8(const float* p) { return _mm256_loadu_ps(p); }
AVX2_FN static inline __m256 kv8(const bf16* p) { return widen8(p); }

template <typename T>
AVX2_FN static void scores_avx2(const float* q, const T* k, int64_t n, int64_t d, int64_t sk, float* scores) {
  const int64_t dv = d / 8;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m256 a[4];
    for (int r = 0; r < 4; ++r) {
      const T* kj = k + (j + r) * sk;
      a[r] = _mm256_mul_ps(_mm256_loadu_ps(q), kv8(kj));
      for (int64_t c = 1; c < dv; ++c) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), kv8(kj + 8 * c), a[r]);
    }
    _mm_storeu_ps(scores + j, sum4x8(a[0], a[1], a[2], a[3]));
  }
  for (; j < n; ++j) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(q), kv8(k + j * sk));
    for (int64_t c = 1; c < dv; ++c) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), kv8(k + j * sk + 8 * c), a);
    const __m256 z = _mm256_setzero_ps();
    scores[j] = _mm_cvtss_f32(sum4x8(a, z, z, z));
  }
}

AVX2_FN static inline __m256 exp_avx2(__m256 x) {
  const __m256 zero = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);  // (and -inf)
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[i]));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(zero, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

// s[0..n) -> exp(s - max(s)) in place; returns their sum (a softmax's numerators and denominator)
AVX2_FN static float exp_sum_avx2(float* s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), mxv));
    _mm256_storeu_ps(s + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  const __m256 z = _mm256_setzero_ps();
  float sum = _mm_cvtss_f32(sum4x8(sv, z, z, z));
  for (; j < n; ++j) sum += s[j] = _mm256_cvtss_f32(exp_avx2(_mm256_set1_ps(s[j] - mx)));
  return sum;
}

template <typename T>
AVX2_FN static void softmax_attend_avx2(const float* __restrict q, const T* __restrict k, const T* __restrict v,
                                        int64_t n, int64_t d, int64_t sk, const bool* __restrict mask,
                                        float* __restrict scores, float* __restrict out) {
  scores_avx2(q, k, n, d, sk, scores);
  const float ninf = -std::numeric_limits<float>::infinity();
  if (mask)
    for (int64_t j = 0; j < n; ++j) scores[j] = mask[j] ? scores[j] : ninf;
  const __m256 inv = _mm256_set1_ps(1.f / exp_sum_avx2(scores, n));
  const int64_t dv = d / 8;
  __m256 acc[16];
  for (int64_t c = 0; c < dv; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 pj = _mm256_set1_ps(scores[j]);
    for (int64_t c = 0; c < dv; ++c) acc[c] = _mm256_fmadd_ps(pj, kv8(v + j * sk + 8 * c), acc[c]);
  }
  for (int64_t c = 0; c < dv; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], inv));
}
#endif

template <typename T>
static inline __attribute__((always_inline)) void softmax_attend_generic(const float* q, const T* k, const T* v,
                                                                         int64_t n, int64_t d, int64_t sk,
                                                                         const bool* mask, float* scores, float* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    float s = dot(q, k + j * sk, d);
    if (mask && !mask[j]) s = -std::numeric_limits<float>::infinity();
    scores[j] = s;
    mx = std::max(mx, s);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += scores[j] = std::exp(scores[j] - mx);
  const float inv = 1.f / sum;
  for (int64_t t = 0; t < d; ++t) out[t] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float p = scores[j] * inv;
    const T* vj = v + j * sk;
    for (int64_t t = 0; t < d; ++t) out[t] += p * kv_float(vj[t]);
  }
}

// (one function per cache type: target_clones makes its copies of a plain function, not of a template)
VECTORIZED static void softmax_attend(const float* q, const float* k, const float* v, int64_t n, int64_t d,
                                      int64_t sk, const bool* mask, float* scores, float* out) {
#if defined(__x86_64__)
  if (kAvx512 && d % 16 == 0 && d <= 256) return softmax_attend_avx512(q, k, v, n, d, sk, mask, scores, out);
  if (kAvx2 && d % 8 == 0 && d <= 128) return softmax_attend_avx2(q, k, v, n, d, sk, mask, scores, out);
#endif
  softmax_attend_generic(q, k, v, n, d, sk, mask, scores, out);
}

VECTORIZED static void softmax_attend(const float* q, const bf16* k, const bf16* v, int64_t n, int64_t d,
                                      int64_t sk, const bool* mask, float* scores, float* out) {
#if defined(__x86_64__)
  if (kAvx512 && d % 16 == 0 && d <= 256) return softmax_attend_avx512(q, k, v, n, d, sk, mask, scores, out);
  if (kAvx2 && d % 8 == 0 && d <= 128) return softmax_attend_avx2(q, k, v, n, d, sk, mask, scores, out);
#endif
  softmax_attend_generic(q, k, v, n, d, sk, mask, scores, out);
}

// qkv [B, (H + 2 n_kv) d] bf16 (this step's projections); cos/sin [B, d] bf16 (sin signed as in model.apply_rope);
// kc/vc [>=B, n_kv, L, d] caches, both fp32 or both bf16; pos [B] int64. Rotates q and k, writes k/v at pos, attends
// over 0..pos, or over the last `window` positions of it where window > 0 (a sliding window). Prompts (optional): pk/pv [B (stride may be 0), n_kv, K, d] fp32, gate [B, H] fp32, pmask [B, K] bool.
// Returns y [B, H d] bf16 = bf16(token attention + gate * prompt attention).
template <typename T>
static torch::Tensor attention_over(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                    torch::Tensor& kc, torch::Tensor& vc, const torch::Tensor& pos, int64_t n_heads,
                                    const c10::optional<torch::Tensor>& pk, const c10::optional<torch::Tensor>& pv,
                                    const c10::optional<torch::Tensor>& gate,
                                    const c10::optional<torch::Tensor>& pmask, int64_t window) {
  const int64_t B = qkv.size(0), n_kv = kc.size(1), L = kc.size(2), d = kc.size(3), H = n_heads;
  TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == (H + 2 * n_kv) * d, "attention: qkv");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && pos.is_contiguous(), "attention: rope/pos");
  const bool prompts = pk.has_value();
  const int64_t rep = H / n_kv, half = d / 2;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const bf16 *qp = qkv.data_ptr<bf16>(), *cp = cos.data_ptr<bf16>(), *sp = sin.data_ptr<bf16>();
  const int64_t* posp = pos.data_ptr<int64_t>();
  T *kcp = kc.data_ptr<T>(), *vcp = vc.data_ptr<T>();
  // one head x rotated into out, with apply_rope's bf16 roundings: rope_head's vectors where the halves are whole
  // vectors (with the scalar form, a SmolLM2-135M layer's call took 8.9 us at the first position, 2.4 with these)
#if defined(__x86_64__)
  const bool vector_rope = kBf16Dot && half % 16 == 0;
#else
  const bool vector_rope = false;
#endif
  auto rotate = [&](const bf16* x, const bf16* c, const bf16* s, bf16* out) {
#if defined(__x86_64__)
    if (vector_rope) return rope_head(x, c, s, out, d, false);
#endif
    for (int64_t t = 0; t < d; ++t) out[t] = b(f(b(f(x[t]) * f(c[t]))) + f(b(f(x[(t + half) % d]) * f(s[t]))));
  };
  // write this step's keys (rotated) and values, for every row, before any row reads
  std::vector<bf16> rotated(d);
  for (int64_t i = 0; i < B; ++i) {
    const bf16* row = qp + i * (H + 2 * n_kv) * d;
    const int64_t p = posp[i];
    TORCH_CHECK(p >= 0 && p < L, "attention: position beyond the cache");
    for (int64_t g = 0; g < n_kv; ++g) {
      const bf16* vx = row + (H + n_kv + g) * d;
      T* kd = kcp + ((i * n_kv + g) * L + p) * d;
      T* vd = vcp + ((i * n_kv + g) * L + p) * d;
      rotate(row + (H + g) * d, cp + i * d, sp + i * d, rotated.data());
      for (int64_t t = 0; t < d; ++t) {
        kd[t] = kv_store<T>(f(rotated[t]));
        vd[t] = kv_store<T>(f(vx[t]));
      }
    }
  }
  auto y = torch::empty({B, H * d}, qkv.options());
  bf16* yp = y.data_ptr<bf16>();
  const int64_t Kp = prompts ? pk->size(2) : 0;
  const float *pkp = nullptr, *pvp = nullptr, *gp = nullptr;
  const bool* pmp = nullptr;
  int64_t pks0 = 0, pvs0 = 0;
  if (prompts) {
    TORCH_CHECK(pk->scalar_type() == at::kFloat && pv->scalar_type() == at::kFloat && gate.has_value());
    TORCH_CHECK(pk->stride(3) == 1 && pk->stride(2) == d && pk->stride(1) == Kp * d, "attention: prompt k layout");
    TORCH_CHECK(pv->stride(3) == 1 && pv->stride(2) == d && pv->stride(1) == Kp * d, "attention: prompt v layout");
    pkp = pk->data_ptr<float>(), pvp = pv->data_ptr<float>(), gp = gate->data_ptr<float>();
    pks0 = pk->stride(0), pvs0 = pv->stride(0);
    TORCH_CHECK(gate->is_contiguous() && gate->scalar_type() == at::kFloat, "attention: gate");
    if (pmask.has_value()) {
      TORCH_CHECK(pmask->is_contiguous() && pmask->scalar_type() == at::kBool, "attention: prompt mask");
      pmp = pmask->data_ptr<bool>();
    }
  }
  // the first position each row attends to
  auto first = [&](int64_t i) { return window > 0 ? std::max<int64_t>(0, posp[i] + 1 - window) : int64_t{0}; };
  int64_t work = 0;  // multiply-adds; a short cache is not worth waking the other threads for
  for (int64_t i = 0; i < B; ++i) work += (posp[i] + 1 - first(i) + Kp) * H * d;
  at::parallel_for(0, B * H, work < (1 << 16) ? B * H : 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> q(d), o(d), po(d), scores(std::max<int64_t>(L, Kp));
    std::vector<bf16> qr(d);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w / H, h = w % H, g = h / rep;
      const bf16* row = qp + i * (H + 2 * n_kv) * d;
      rotate(row + h * d, cp + i * d, sp + i * d, qr.data());
      for (int64_t t = 0; t < d; ++t) q[t] = f(qr[t]) * scale;
      const int64_t s0 = first(i), base = ((i * n_kv + g) * L + s0) * d;
      softmax_attend(q.data(), kcp + base, vcp + base, posp[i] + 1 - s0, d, d, nullptr, scores.data(), o.data());
      if (prompts) {
        softmax_attend(q.data(), pkp + i * pks0 + g * Kp * d, pvp + i * pvs0 + g * Kp * d, Kp, d, d,
                       pmp ? pmp + i * Kp : nullptr, scores.data(), po.data());
        const float gt = gp[i * H + h];
        for (int64_t t = 0; t < d; ++t) o[t] += po[t] * gt;
      }
      for (int64_t t = 0; t < d; ++t) yp[i * H * d + h * d + t] = b(o[t]);
    }
  });
  return y;
}

torch::Tensor attention(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                        torch::Tensor& kc, torch::Tensor& vc, const torch::Tensor& pos, int64_t n_heads,
                        const c10::optional<torch::Tensor>& pk, const c10::optional<torch::Tensor>& pv,
                        const c10::optional<torch::Tensor>& gate, const c10::optional<torch::Tensor>& pmask,
                        int64_t window) {
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == vc.scalar_type() &&
                  (kc.scalar_type() == at::kFloat || kc.scalar_type() == at::kBFloat16), "attention: cache");
  TORCH_CHECK(window >= 0, "attention: window");
  const auto over = kc.scalar_type() == at::kFloat ? attention_over<float> : attention_over<bf16>;
  return over(qkv, cos, sin, kc, vc, pos, n_heads, pk, pv, gate, pmask, window);
}

#if defined(__x86_64__)
// ---- a prefill's causal attention on AVX2: query rows 3 at a time against keys 32 at a time -----------------
// One query row at a time (the decode step's kernel) loads and widens every key and value once per row and sums
// each score across a vector's lanes: 34 GFLOP/s on the 2-core Zen 3 VM at T = 512, d = 64. Here a key/value
// head's keys are widened once, transposed into blocks of 32 ([d][32]), and 3 query rows (the heads that share it,
// or neighbouring positions) meet a block in 12 accumulators, 32 scores each of the 3 rows with no sums across
// lanes; their probabilities then meet the widened values 32 channels at a time the same way. fp32 throughout,
// as the one-row kernel (the sums in another order: equal to fp32 rounding).
// rows a pass, keys a block, at most this many positions a unit of the threads' work (fewer in a short prompt, so
// it still makes units enough to share: T / 32 of them, at least one), a prompt from this many tokens on
constexpr int64_t kPrefillRows = 3, kPrefillKeys = 32, kPrefillTile = 16, kPrefillMinTokens = 16;

// k/v [T, d] of one key/value head -> kt [ceil(T / 32)][d][32] (keys past T: 0) and vf [T][d], fp32
template <typename KV>
static void widen_keys_values(const KV* k, const KV* v, int64_t T, int64_t d, float* kt, float* vf) {
  for (int64_t jb = 0; jb < (T + kPrefillKeys - 1) / kPrefillKeys; ++jb)
    for (int64_t c = 0; c < d; ++c)
      for (int64_t jj = 0; jj < kPrefillKeys; ++jj) {
        const int64_t j = jb * kPrefillKeys + jj;
        kt[(jb * d + c) * kPrefillKeys + jj] = j < T ? kv_float(k[j * d + c]) : 0.f;
      }
  for (int64_t i = 0; i < T * d; ++i) vf[i] = kv_float(v[i]);
}

// s[r][0..32) = q_r . keys of the block ktb ([d][32]) for R rows of q ([R][d], stride d; s: stride ss)
template <int R>
AVX2_FN static void prefill_scores(const float* q, int64_t d, const float* ktb, float* s, int64_t ss) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < 4; ++x) acc[r][x] = _mm256_setzero_ps();
  int64_t c = 0;
  do {  // (d > 0: as a for loop, GCC 12 stored the 12 accumulators to the stack at every step, 2.6x slower)
    __m256 qv[R];  // (12 accumulators, 3 rows' broadcasts and one block vector: the 16 ymm registers)
    for (int r = 0; r < R; ++r) qv[r] = _mm256_broadcast_ss(q + r * d + c);
    for (int x = 0; x < 4; ++x) {
      const __m256 kx = _mm256_loadu_ps(ktb + c * kPrefillKeys + 8 * x);
      for (int r = 0; r < R; ++r) acc[r][x] = _mm256_fmadd_ps(qv[r], kx, acc[r][x]);
    }
  } while (++c < d);
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < 4; ++x) _mm256_storeu_ps(s + r * ss + 8 * x, acc[r][x]);
}

// o[r] = sum_j<n p[r][j] v[j] for R rows of p (stride ps) over vf [n][d] (d % 32 == 0), o [R][d]
template <int R>
AVX2_FN static void prefill_attend(const float* p, int64_t ps, const float* vf, int64_t d, int64_t n, float* o) {
  for (int64_t c0 = 0; c0 < d; c0 += 32) {
    __m256 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int x = 0; x < 4; ++x) acc[r][x] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      __m256 pv[R];
      for (int r = 0; r < R; ++r) pv[r] = _mm256_broadcast_ss(p + r * ps + j);
      for (int x = 0; x < 4; ++x) {
        const __m256 vx = _mm256_loadu_ps(vf + j * d + c0 + 8 * x);
        for (int r = 0; r < R; ++r) acc[r][x] = _mm256_fmadd_ps(pv[r], vx, acc[r][x]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int x = 0; x < 4; ++x) _mm256_storeu_ps(o + r * d + c0 + 8 * x, acc[r][x]);
  }
}

// s[0..n) -> exp(s - max) (s[n..end): 0); returns 1 / their sum
AVX2_FN static float prefill_softmax(float* s, int64_t n, int64_t end) {
  const float inv = 1.f / exp_sum_avx2(s, n);
  std::fill(s + n, s + end, 0.f);
  return inv;
}

using PrefillScoresFn = void (*)(const float*, int64_t, const float*, float*, int64_t);
using PrefillAttendFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*);
static const PrefillScoresFn kPrefillScores[kPrefillRows] = {prefill_scores<1>, prefill_scores<2>, prefill_scores<3>};
static const PrefillAttendFn kPrefillAttend[kPrefillRows] = {prefill_attend<1>, prefill_attend<2>, prefill_attend<3>};

// prefill_attention_over's arguments (q contiguous; d % 32 == 0): the blocked AVX2 form
template <typename KV>
static void prefill_attention_blocked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      torch::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), n_kv = k.size(1), rep = H / n_kv;
  const int64_t sb = k.stride(0), sh = k.stride(1), blocks = (T + kPrefillKeys - 1) / kPrefillKeys;
  const int64_t ktn = blocks * kPrefillKeys * d, groups = B * n_kv;
  const int64_t tile_len = std::clamp<int64_t>(T / 32, 1, kPrefillTile), tiles = (T + tile_len - 1) / tile_len;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const bf16* qp = q.data_ptr<bf16>();
  const KV *kp = k.data_ptr<KV>(), *vp = v.data_ptr<KV>();
  bf16* yp = y.data_ptr<bf16>();
  std::unique_ptr<float[]> kt(new float[groups * ktn]), vf(new float[groups * T * d]);
  for_chunks(groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t head = g / n_kv * sb + g % n_kv * sh;
      widen_keys_values(kp + head, vp + head, T, d, kt.get() + g * ktn, vf.get() + g * T * d);
    }
  });
  // a unit: one key/value head's query heads at tile_len positions, whose cost grows with the position. The
  // guided schedule hands a thread the first half of the units at once, so they alternate long and short (the last
  // tile, the first, the last but one, ...): any run of them costs about its share. Longest first instead gave the
  // first thread 3/4 of the work (two threads 1.5x one at T = 512 on the Zen 3 VM)
  for_chunks(groups * tiles, 1, [&](int64_t u0, int64_t u1) {
    const int64_t ss = blocks * kPrefillKeys;
    std::vector<float> qf(kPrefillRows * d), s(kPrefillRows * ss), o(kPrefillRows * d);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g = u % groups, nth = u / groups, i = g / n_kv;
      const int64_t tile = nth % 2 == 0 ? tiles - 1 - nth / 2 : nth / 2;
      const int64_t t0 = tile * tile_len, rows = (std::min(T, t0 + tile_len) - t0) * rep;
      const float *ktg = kt.get() + g * ktn, *vfg = vf.get() + g * T * d;
      for (int64_t r0 = 0; r0 < rows; r0 += kPrefillRows) {  // rows in (position, head) order
        const int R = static_cast<int>(std::min(kPrefillRows, rows - r0));
        int64_t at[kPrefillRows];  // each row's offset in q and y
        for (int r = 0; r < R; ++r) {
          const int64_t t = t0 + (r0 + r) / rep, h = g % n_kv * rep + (r0 + r) % rep;
          at[r] = ((i * H + h) * T + t) * d;
          for (int64_t c = 0; c < d; ++c) qf[r * d + c] = f(qp[at[r] + c]) * scale;
        }
        const int64_t n = t0 + (r0 + R - 1) / rep + 1;  // the last row's keys: the most of the R rows
        for (int64_t jb = 0; jb * kPrefillKeys < n; ++jb)
          kPrefillScores[R - 1](qf.data(), d, ktg + jb * kPrefillKeys * d, s.data() + jb * kPrefillKeys, ss);
        float inv[kPrefillRows];
        for (int r = 0; r < R; ++r) inv[r] = prefill_softmax(s.data() + r * ss, t0 + (r0 + r) / rep + 1, n);
        kPrefillAttend[R - 1](s.data(), ss, vfg, d, n, o.data());
        for (int r = 0; r < R; ++r)
          for (int64_t c = 0; c < d; ++c) yp[at[r] + c] = b(o[r * d + c] * inv[r]);
      }
    }
  });
}
#endif

// causal softmax(q k^T / sqrt(d)) v of a prefill without gradients: q [B, H, T, d] bf16, k/v [B, n_kv, T, d] fp32 or
// bf16 (rows of d contiguous; a cache's slices do) -> [B, H, T, d] bf16. Query t attends to keys 0..t, one query at a
// time by the decode step's kernel (fp32 arithmetic, as the decode step's), queries handed to threads in chunks.
// SDPA's CPU kernels took 2-3x longer at T = 512, d = 64 (40 % of a 512-token prefill of SmolLM2-135M). Where AVX2
// is the widest ISA, from kPrefillMinTokens on (d % 32 == 0): prefill_attention_blocked, fp32 too.
template <typename KV>
static torch::Tensor prefill_attention_over(const torch::Tensor& q_in, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.scalar_type() == at::kBFloat16, "prefill_attention: q");
  TORCH_CHECK(k.sizes() == v.sizes() &&
                  k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == k.size(3) && v.stride(2) == v.size(3) &&
                  k.stride(1) == v.stride(1) && k.stride(0) == v.stride(0), "prefill_attention: k/v");
  const auto q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), n_kv = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(2) == T && k.size(3) == d && H % n_kv == 0, "prefill_attention: shapes");
  const int64_t rep = H / n_kv, sb = k.stride(0), sh = k.stride(1);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  auto y = torch::empty_like(q);
  const bf16* qp = q.data_ptr<bf16>();
  const KV *kp = k.data_ptr<KV>(), *vp = v.data_ptr<KV>();
#if defined(__x86_64__)
  if (kAvx2 && !kAvx512 && d % 32 == 0 && d <= 256 && T >= kPrefillMinTokens) {
    prefill_attention_blocked<KV>(q, k, v, y);
    return y;
  }
#endif
  bf16* yp = y.data_ptr<bf16>();
  for_chunks(B * H * T, 16, [&](int64_t w0, int64_t w1) {
    std::vector<float> qf(d), o(d), scores(T);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w / (H * T), h = w / T % H, t = w % T, head = i * sb + h / rep * sh;
      for (int64_t c = 0; c < d; ++c) qf[c] = f(qp[w * d + c]) * scale;
      softmax_attend(qf.data(), kp + head, vp + head, t + 1, d, d, nullptr, scores.data(), o.data());
      for (int64_t c = 0; c < d; ++c) yp[w * d + c] = b(o[c]);
    }
  });
  return y;
}

torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16), "prefill_attention: k/v");
  return k.scalar_type() == at::kFloat ? prefill_attention_over<float>(q, k, v) : prefill_attention_over<bf16>(q, k, v);
}

// ---- a forward's keys and values into the cache ---------------------------------------------------------------
// k/v [B, n_kv, T, d] bf16 or fp32 (rows of d contiguous), rows/pos [B, T] int64 -> kc/vc[rows[b, t], :, pos[b, t]]
// = k/v[b, :, t] in the cache's dtype, fp32 or bf16 (as ATen's copy: widened exactly, or rounded to nearest even). What `Attention.store` does with two index_put_ and two
// casts, ~120-170 us a layer of a SmolLM2-135M 32-token prefill on the AMD EPYC VM, in one call.
// src [B, n_kv, T, d] -> dst[rows[b, t], :, pos[b, t]] (rows/pos [B, T] contiguous)
template <typename S, typename D>
static void cache_from(const torch::Tensor& src, torch::Tensor& dst, const int64_t* rp, const int64_t* pp) {
  const int64_t B = src.size(0), n_kv = src.size(1), T = src.size(2), d = src.size(3);
  const S* sp = src.data_ptr<S>();
  D* dp = dst.data_ptr<D>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < n_kv; ++h) {
        const S* in = sp + b * src.stride(0) + h * src.stride(1) + t * src.stride(2);
        D* out = dp + rp[b * T + t] * dst.stride(0) + h * dst.stride(1) + pp[b * T + t] * dst.stride(2);
        for (int64_t c = 0; c < d; ++c) out[c] = kv_store<D>(static_cast<float>(in[c]));
      }
}

void cache_write(torch::Tensor& kc, torch::Tensor& vc, const torch::Tensor& k, const torch::Tensor& v,
                 const torch::Tensor& rows_in, const torch::Tensor& pos_in) {
  TORCH_CHECK(kc.dim() == 4 && kc.is_contiguous() && vc.is_contiguous() && kc.sizes() == vc.sizes() &&
                  kc.scalar_type() == vc.scalar_type() &&
                  (kc.scalar_type() == at::kFloat || kc.scalar_type() == at::kBFloat16), "cache_write: caches");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kFloat) && k.stride(3) == 1 &&
                  v.stride(3) == 1 && k.size(1) == kc.size(1) && k.size(3) == kc.size(3), "cache_write: k/v");
  const int64_t B = k.size(0), T = k.size(2), R = kc.size(0), L = kc.size(2);
  const auto rows = rows_in.expand({B, T}).contiguous(), pos = pos_in.expand({B, T}).contiguous();
  TORCH_CHECK(rows.scalar_type() == at::kLong && pos.scalar_type() == at::kLong, "cache_write: rows/pos");
  const int64_t *rp = rows.data_ptr<int64_t>(), *pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < R && pp[i] >= 0 && pp[i] < L, "cache_write: a position beyond the cache");
  const bool from_fp32 = k.scalar_type() == at::kFloat, to_fp32 = kc.scalar_type() == at::kFloat;
  const auto write = from_fp32 ? (to_fp32 ? cache_from<float, float> : cache_from<float, bf16>)
                               : (to_fp32 ? cache_from<bf16, float> : cache_from<bf16, bf16>);
  write(k, kc, rp, pp);
  write(v, vc, rp, pp);
}

// ---- greedy decoding's choice: the index of each row's largest logit --------------------------------------
// ATen's CPU argmax walks a row one element at a time: ~55 us for SmolLM2's 49152 fp32 logits (190 in bf16) on the
// machines we measured, 1 % of an int8 decode step. This takes 16 lanes at a time: each lane keeps its largest value
// and where it first saw it (a strict > keeps the first), then the lanes with the row's maximum give the smallest
// of their indices, which is the first index of the maximum, as torch.argmax returns. A row with a NaN gives its
// first NaN's index (torch counts NaN as the largest).
static int64_t argmax_row_scalar(const bf16* x, int64_t V) {
  int64_t best = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (std::isnan(f(x[i]))) return i;
    if (f(x[i]) > f(x[best])) best = i;
  }
  return best;
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) static int64_t argmax_row(const bf16* x, int64_t V) {
  const int64_t whole = V / 16 * 16;
  if (whole == 0) return argmax_row_scalar(x, V);
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i at = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < whole; i += 16, idx = _mm512_add_epi32(idx, step)) {
    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), 16));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 more = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, more, v);
    at = _mm512_mask_mov_epi32(at, more, idx);
  }
  if (nan) return argmax_row_scalar(x, V);
  const float top = _mm512_reduce_max_ps(best);
  // lanes holding the maximum: the smallest index among them (lanes that never moved hold 0 with -inf, which is
  // the maximum only when every value is -inf, and then index 0 is the answer)
  const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
  int64_t first = _mm512_mask_reduce_min_epi32(tops, at);
  for (int64_t i = whole; i < V; ++i) {
    if (std::isnan(f(x[i]))) return i;
    if (f(x[i]) > f(x[first])) first = i;
  }
  return first;
}
#endif

// x [B, V] bf16 contiguous -> [B] int64
torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.size(1) > 0 &&
                  x.size(1) < (int64_t{1} << 31), "argmax_rows: x [B, V] bf16");
  const int64_t B = x.size(0), V = x.size(1);
  auto out = torch::empty({B}, x.options().dtype(at::kLong));
  const bf16* xp = x.data_ptr<bf16>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r) {
#if defined(__x86_64__)
    op[r] = kAvx512 ? argmax_row(xp + r * V, V) : argmax_row_scalar(xp + r * V, V);
#else
    op[r] = argmax_row_scalar(xp + r * V, V);
#endif
  }
  return out;
}

// ---- sampling: top-p / top-k over one row of logits, one uniform number a row ---------------------------------
#if defined(__x86_64__)
// the whole 16-lane blocks of sum_exp
template <typename T>
__attribute__((target("avx512f"))) static float sum_exp_avx512(const T* x, int64_t V, float t, float m) {
  const __m512 tv = _mm512_set1_ps(t), mv = _mm512_set1_ps(m), lo = _mm512_set1_ps(-80.f);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i + 16 <= V; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_div_ps(kv16(x + i), tv), mv);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, lo, _CMP_GE_OQ), exp_avx512(d)));
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

// What inference.sampling.sample computes (its docstring), in one pass over the row instead of ~50 tensor ops: x =
// logit / temperature; the row's log-sum-exp leaving out what lies below e^-80 of its best token; the nucleus from
// the tokens within e^-kNear of the best (their probabilities summing past top_p: every other token then has more
// than top_p before it), or from the whole row where they do not; ranked by x and then token id; the token at u of
// the kept tokens' cumulative sum. Sums run in another order than ATen's, so a u within a rounding of a boundary
// between two tokens can pick the other one.
constexpr float kNear = 12.f;

// sum of e^(x / t - m) over a row, leaving out what lies below e^-80
template <typename T>
static float sum_exp(const T* x, int64_t V, float t, float m) {
  float s = 0.f;
  int64_t i = 0;
#if defined(__x86_64__)
  if (kAvx512) {
    s = sum_exp_avx512(x, V, t, m);
    i = V / 16 * 16;
  }
#endif
  for (; i < V; ++i) {
    const float d = kv_float(x[i]) / t - m;
    s += d < -80.f ? 0.f : std::exp(d);
  }
  return s;
}

template <typename T>
static int64_t sample_row(const T* logits, int64_t V, float temperature, float top_p, int64_t top_k, float u,
                          std::vector<std::pair<float, int64_t>>& ranked) {
  const float t = std::max(temperature, 1e-5f);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < V; ++i) top = std::max(top, kv_float(logits[i]));
  const float m = top / t;  // = the largest logit / t: rounding a quotient keeps the order
  auto prob_of = [&](float x, float lse) { return x - lse < -80.f ? 0.f : std::exp(x - lse); };
  const float lse = m + std::log(sum_exp(logits, V, t, m));
  // the token at u of the first n tokens' cumulative sum, whose total the caller has summed in the same order
  auto pick = [&](const std::vector<std::pair<float, int64_t>>& toks, size_t n, float total) {
    const float target = u * total;
    float c = 0.f;
    for (size_t j = 0; j < n; ++j) {
      c += prob_of(toks[j].first, lse);
      if (c > target) return toks[j].second;
    }
    return toks[n - 1].second;
  };
  const bool whole = top_p >= 1.f && top_k <= 0;
  ranked.clear();
  if (!whole) {  // the tokens near the best, enough of them to hold the nucleus
    float near = 0.f;
    const float below = (m - kNear - 1.f) * t;  // a logit under this is not near whatever the roundings
    for (int64_t i = 0; i < V; ++i) {
      if (kv_float(logits[i]) < below) continue;
      const float x = kv_float(logits[i]) / t;
      if (x - m >= -kNear) {
        ranked.emplace_back(x, i);
        near += prob_of(x, lse);
      }
    }
    if (!(near > top_p)) ranked.clear();
  }
  if (ranked.empty()) {
    for (int64_t i = 0; i < V; ++i) ranked.emplace_back(static_cast<float>(logits[i]) / t, i);
    if (whole) {  // every token, in id order
      float total = 0.f;
      for (const auto& tok : ranked) total += prob_of(tok.first, lse);
      return pick(ranked, ranked.size(), total);
    }
  }
  std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  size_t kept = 0;
  float before = 0.f;
  for (; kept < ranked.size(); ++kept) {
    if (before > top_p || (top_k > 0 && static_cast<int64_t>(kept) >= top_k)) break;
    before += prob_of(ranked[kept].first, lse);
  }
  return pick(ranked, kept, before);  // (kept >= 1: the first is always kept)
}

// logits [B, V] bf16 or fp32; temperature, top_p [B] fp32; top_k, greedy [B] int64; u [B] fp32 in [0, 1) -> [B]
// int64: greedy's token where temperature <= 0, else the row's draw
torch::Tensor sample_rows(const torch::Tensor& logits, const torch::Tensor& temperature, const torch::Tensor& top_p,
                          const torch::Tensor& top_k, const torch::Tensor& u, const torch::Tensor& greedy) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0 &&
                  (logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat),
              "sample_rows: logits [B, V] bf16 or fp32");
  const int64_t B = logits.size(0), V = logits.size(1);
  const auto tt = temperature.to(at::kFloat).contiguous(), pp = top_p.to(at::kFloat).contiguous();
  const auto kk = top_k.to(at::kLong).contiguous(), uu = u.to(at::kFloat).contiguous();
  const auto gg = greedy.to(at::kLong).contiguous();
  TORCH_CHECK(tt.numel() == B && pp.numel() == B && kk.numel() == B && uu.numel() == B && gg.numel() == B,
              "sample_rows: one setting a row");
  auto out = torch::empty({B}, logits.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  std::vector<std::pair<float, int64_t>> ranked;
  for (int64_t r = 0; r < B; ++r) {
    const float t = tt.data_ptr<float>()[r];
    if (!(t > 0.f)) {
      op[r] = gg.data_ptr<int64_t>()[r];
      continue;
    }
    const float p = pp.data_ptr<float>()[r], uv = uu.data_ptr<float>()[r];
    const int64_t k = kk.data_ptr<int64_t>()[r];
    op[r] = logits.scalar_type() == at::kFloat ? sample_row(logits.data_ptr<float>() + r * V, V, t, p, k, uv, ranked)
                                               : sample_row(logits.data_ptr<bf16>() + r * V, V, t, p, k, uv, ranked);
  }
  return out;
}

// ---- the layer stack of one decode step in one call ------------------------------------------------------
// Called from Python, the step is ~7 calls a layer (200 for a 30-layer model) whose interpreter and argument
// conversion cost ~1.5 ms a token on the machines we measured, a sixth of the step. The plan below is built once
// per batch (weights, caches and the batch's prompts do not change between its steps) and runs the same kernels,
// in the same order and with the same roundings, as fused_decode.decode_step's Python loop.

// one frozen projection: kind 0: bf16 weight packed for `linear` (a); 1: int8 rows (a) and fp32 row scales (b) for
// `linear_int8` (bias fp32); 2: ATen's CPU int4 pack (a) and its scale_and_zero (b), groups of `group` inputs
struct Projection {
  int64_t kind, n, group;
  torch::Tensor a, b;
  c10::optional<torch::Tensor> bias;

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (kind == 0) return linear(x, a, n, bias);
    if (kind == 1) return linear_int8(x, a, b, bias);
    TORCH_CHECK(kind == 2, "decode plan: unknown projection kind");
    auto y = at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16).contiguous(), a, group, b);
    if (y.size(1) != n) y = y.narrow(1, 0, n).contiguous();
    y = y.to(x.scalar_type());
    return bias.has_value() ? y + *bias : y;
  }
};

class DecodePlan {
 public:
  // per layer i: projections 4i..4i+3 (wqkv, wo, w13, w2), norms 2i, 2i+1 (attention, feed-forward) and the final
  // norm last; caches kc/vc [rows, n_kv, L, d] fp32 or bf16; prompts (pk, pv, gate, pmask) per layer or None
  DecodePlan(std::vector<int64_t> kinds, std::vector<int64_t> ns, std::vector<int64_t> groups,
             std::vector<torch::Tensor> a, std::vector<torch::Tensor> b, std::vector<c10::optional<torch::Tensor>> bias,
             std::vector<torch::Tensor> norms, double eps, int64_t n_heads, std::vector<torch::Tensor> kc,
             std::vector<torch::Tensor> vc, std::vector<c10::optional<torch::Tensor>> pk,
             std::vector<c10::optional<torch::Tensor>> pv, std::vector<c10::optional<torch::Tensor>> gate,
             std::vector<c10::optional<torch::Tensor>> pmask)
      : norms_(std::move(norms)), eps_(eps), n_heads_(n_heads), kc_(std::move(kc)), vc_(std::move(vc)),
        pk_(std::move(pk)), pv_(std::move(pv)), gate_(std::move(gate)), pmask_(std::move(pmask)) {
    const size_t L = kc_.size();
    TORCH_CHECK(kinds.size() == 4 * L && ns.size() == 4 * L && groups.size() == 4 * L && a.size() == 4 * L &&
                    b.size() == 4 * L && bias.size() == 4 * L, "decode plan: four projections a layer");
    TORCH_CHECK(vc_.size() == L && norms_.size() == 2 * L + 1 && pk_.size() == L && pv_.size() == L &&
                    gate_.size() == L && pmask_.size() == L, "decode plan: per-layer lists");
    for (size_t i = 0; i < 4 * L; ++i) proj_.push_back({kinds[i], ns[i], groups[i], a[i], b[i], bias[i]});
  }

  // the model's sliding window (0: none), as `attention` takes it
  void set_window(int64_t window) {
    TORCH_CHECK(window >= 0, "decode plan: window");
    window_ = window;
  }

  // the step's two ends, for `step`: the token embeddings [V, dim] bf16, the model's RoPE tables cos/sin
  // [positions, d] fp32 (rounded to bf16 here, as the Python step's .to(bfloat16)), and the output head as one more
  // projection (head_kind < 0: none, `step` then returns the final norm's output)
  void set_ends(const torch::Tensor& embed, const torch::Tensor& cos, const torch::Tensor& sin, int64_t head_kind,
                int64_t head_n, int64_t head_group, const torch::Tensor& head_a, const torch::Tensor& head_b,
                const c10::optional<torch::Tensor>& head_bias) {
    TORCH_CHECK(embed.dim() == 2 && embed.scalar_type() == at::kBFloat16, "decode plan: embeddings [V, dim] bf16");
    TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.scalar_type() == at::kFloat &&
                    sin.scalar_type() == at::kFloat, "decode plan: RoPE tables [positions, d] fp32");
    embed_ = embed.contiguous(), cos_ = cos.contiguous(), sin_ = sin.contiguous();
    head_.reset();
    if (head_kind >= 0) head_ = Projection{head_kind, head_n, head_group, head_a, head_b, head_bias};
  }

  // one whole decode step from tokens [B] and positions [B] (int64), as the Python step computes it from
  // model.tok_embeddings, model.rope and the head, in one call: [the logits [B, V] bf16, their argmax_rows [B]] with
  // a head, else [the final norm's output]. Those small ops and the argmax were ~0.4 ms of a 6 ms SmolLM2-135M int8
  // step on the Zen 4 we measured (~10x their time in a loop: run from caches the weight stream had just emptied).
  // With `advance` (and a head), the step also writes each row's argmax into `tokens` and moves `pos` on by one,
  // in place (both contiguous): the next step's inputs, for a batch that decodes greedily. Done in Python, those
  // were four tensor ops between steps (two views, a view and an add) at ~10-55 us each, as slow as they are
  // because they run on the caches the weight stream has just emptied: ~0.12 ms of a 5.5 ms int8 step.
  std::vector<torch::Tensor> step(const torch::Tensor& tokens, const torch::Tensor& pos, bool advance) {
    TORCH_CHECK(embed_.defined(), "decode plan: step before set_ends");
    TORCH_CHECK(tokens.dim() == 1 && pos.dim() == 1 && tokens.size(0) == pos.size(0) &&
                    tokens.scalar_type() == at::kLong && pos.scalar_type() == at::kLong,
                "decode plan: tokens, pos [B] int64");
    TORCH_CHECK(!advance || (tokens.is_contiguous() && pos.is_contiguous()),
                "decode plan: advancing needs contiguous tokens and pos");
    const auto tk = tokens.contiguous(), ps = pos.contiguous();
    const int64_t B = tk.size(0), V = embed_.size(0), D = embed_.size(1), S = cos_.size(0), d = cos_.size(1);
    auto x = torch::empty({B, D}, embed_.options());
    auto cos = torch::empty({B, d}, embed_.options()), sin = torch::empty({B, d}, embed_.options());
    const int64_t *tp = tk.data_ptr<int64_t>(), *pp = ps.data_ptr<int64_t>();
    const float *ct = cos_.data_ptr<float>(), *st = sin_.data_ptr<float>();
    bf16 *xp = x.data_ptr<bf16>(), *cp = cos.data_ptr<bf16>(), *sp = sin.data_ptr<bf16>();
    for (int64_t r = 0; r < B; ++r) {
      TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "decode plan: token id out of range");
      TORCH_CHECK(pp[r] >= 0 && pp[r] < S, "decode plan: position past the RoPE table");
      std::memcpy(xp + r * D, embed_.data_ptr<bf16>() + tp[r] * D, D * sizeof(bf16));
      for (int64_t c = 0; c < d; ++c) cp[r * d + c] = b(ct[pp[r] * d + c]), sp[r * d + c] = b(st[pp[r] * d + c]);
    }
    auto h = run(x, cos, sin, ps);
    if (!head_) return {h};
    auto logits = (*head_)(h);
    auto chosen = argmax_rows(logits);
    if (advance) {
      int64_t *tw = tokens.data_ptr<int64_t>(), *pw = pos.data_ptr<int64_t>();
      const int64_t* cp = chosen.data_ptr<int64_t>();
      for (int64_t r = 0; r < B; ++r) tw[r] = cp[r], pw[r] += 1;
    }
    return {logits, chosen};
  }

 private:
  // x [B, dim] bf16: the token embeddings, used as the residual stream (updated in place); cos/sin [B, d] bf16;
  // pos [B] int64 -> the final norm's output [B, dim] bf16
  torch::Tensor run(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& pos) {
    auto h = rms_norm(x, norms_[0], eps_);
    const size_t L = kc_.size();
    for (size_t i = 0; i < L; ++i) {
      const Projection* p = &proj_[4 * i];
      auto y = attention(p[0](h), cos, sin, kc_[i], vc_[i], pos, n_heads_, pk_[i], pv_[i], gate_[i], pmask_[i],
                         window_);
      h = add_rms_norm(x, p[1](y), norms_[2 * i + 1], eps_);
      y = p[3](silu_mul(p[2](h)));
      h = add_rms_norm(x, y, norms_[i + 1 < L ? 2 * i + 2 : 2 * L], eps_);
    }
    return h;
  }

  std::vector<Projection> proj_;
  c10::optional<Projection> head_;
  torch::Tensor embed_, cos_, sin_;
  std::vector<torch::Tensor> norms_;
  double eps_;
  int64_t n_heads_;
  int64_t window_ = 0;  // set_window
  std::vector<torch::Tensor> kc_, vc_;
  std::vector<c10::optional<torch::Tensor>> pk_, pv_, gate_, pmask_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_bf16_dot", &has_bf16_dot);
  m.def("has_blocked_linear", &has_blocked_linear);
  m.def("pack", &pack);
  m.def("linear", &linear);
  m.def("has_int8_linear", &has_int8_linear);
  m.def("linear_int8", &linear_int8);
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("add_rms_norm_rows", &add_rms_norm_rows);
  m.def("has_silu_rows_avx2", &has_silu_rows_avx2);
  m.def("silu_mul", &silu_mul);
  m.def("silu_mul_backward", &silu_mul_backward);
  m.def("rms_norm_train", &rms_norm_train);
  m.def("rms_norm_train_backward", &rms_norm_train_backward, py::arg("x"), py::arg("w"), py::arg("r"), py::arg("dy"),
        py::arg("dres") = py::none());
  m.def("add_rms_norm_train", &add_rms_norm_train);
  m.def("has_exact_silu", &has_exact_silu);
  m.def("cross_entropy_grad_", &cross_entropy_grad_);
  m.def("causal_softmax_", &causal_softmax_);
  m.def("causal_softmax_backward_", &causal_softmax_backward_);
  m.def("fused_attention_kind", &fused_attention_kind);
  m.def("fused_causal_attention", &fused_causal_attention);
  m.def("fused_causal_attention_backward", &fused_causal_attention_backward);
  m.def("rope_qkv", &rope_qkv);
  m.def("prompt_attention", &prompt_attention);
  m.def("prompt_attention_backward", &prompt_attention_backward);
  m.def("rope_qkv_backward", &rope_qkv_backward);
  m.def("attention", &attention);
  m.def("prefill_attention", &prefill_attention);
  m.def("cache_write", &cache_write);
  m.def("sample_rows", &sample_rows);
  m.def("argmax_rows", &argmax_rows);
  py::class_<DecodePlan>(m, "DecodePlan")
      .def(py::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<c10::optional<torch::Tensor>>, std::vector<torch::Tensor>,
                    double, int64_t, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<c10::optional<torch::Tensor>>, std::vector<c10::optional<torch::Tensor>>,
                    std::vector<c10::optional<torch::Tensor>>, std::vector<c10::optional<torch::Tensor>>>())
      .def("set_ends", &DecodePlan::set_ends)
      .def("set_window", &DecodePlan::set_window)
      .def("step", &DecodePlan::step, py::arg("tokens"), py::arg("pos"), py::arg("advance") = false);
}
