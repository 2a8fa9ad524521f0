// Causal attention forward for bf16 tensors on x86 CPUs with AVX512-BF16 (longrope/cpu_attention.py builds and
// calls it). Why it exists: PyTorch's CPU flash-attention kernel widens bf16 to fp32 for its block products, so on a
// CPU without AMX a bf16 model's attention runs no faster than an fp32 one, and at 16k-64k tokens attention is most
// of a forward. Here both block products use vdpbf16ps (bf16 pairs, fp32 accumulation), as the bf16 matmuls do.
//
// Numerics: scores q.k accumulate in fp32, the softmax runs in fp32 with the usual running maximum, probabilities
// are rounded to bf16 for the product with V (as PyTorch's bf16 kernel does), the output accumulates in fp32 and
// is rounded to bf16 once at the end.
//
// Layouts (element strides; the last dimension of q is contiguous):
//   q      [B][Hq][Lq][D] with strides (q_sb, q_sh, q_sl)
//   kp     [B][G][Lk64 / 16][D / 2][16][2]   keys in tiles of 16; one 64-byte row holds d = 2p, 2p+1 of 16 keys
//   vp     [B][G][Lk64 / 2][D][2]            values in key pairs; one 64-byte row holds 16 d of keys 2t, 2t+1
//   out    [B][Lq][Hq][D]                    what transformers' attention functions return
// G key/value heads serve Hq query heads (Hq / G each, grouped-query attention); Lk64 is Lk rounded up to 64.
// Causal alignment is bottom-right: query i sits at position Lk - Lq + i (a prefill has Lq == Lk; a decoding step
// with a cache has Lq < Lk), and attends to keys 0 .. its position.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int kQueryBlock = 32;   // query positions per task (times Hq / G heads: the rows sharing one K/V head)
constexpr int kKeyBlock = 256;    // keys per step of the running softmax
constexpr int kKeyGroup = 64;     // keys per score micro-kernel call: 4 tiles of 16
constexpr int kScoreRows = 4;     // rows per score micro-kernel call (4 x 4 accumulators)
constexpr int kRowPadding = 8;    // rows come in multiples of kScoreRows and of 256 / D (the value micro-kernel's)
constexpr float kLog2e = 1.4426950408889634f;

inline __m512 exp2_ps(__m512 x) {
  // 2^x = 2^n * 2^f, n = round(x), |f| <= 1/2; degree-6 Taylor polynomial of 2^f (relative error < 2e-7).
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

struct Problem {
  const uint16_t* q;
  int64_t q_sb, q_sh, q_sl;
  const uint16_t* kp;
  const uint16_t* vp;
  uint16_t* out;
  int64_t batch, q_heads, kv_heads, q_len, k_len, k_len64;
  float scale_log2;  // softmax scale times log2(e): the softmax runs in base 2
};

// Scores of kScoreRows query rows against one group of 64 keys; writes 64 floats per row. The row count is fixed at
// compile time so that the 16 accumulators stay in registers.
inline void score_group(const uint16_t* const* q_rows, const uint16_t* key_tiles, int64_t tile_stride, int pairs,
                        float scale, float* s, int64_t s_stride) {
  __m512 acc[kScoreRows][4];
  for (int r = 0; r < kScoreRows; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int p = 0; p < pairs; ++p) {
    const __m512i k0 = _mm512_loadu_si512(key_tiles + 0 * tile_stride + p * 32);
    const __m512i k1 = _mm512_loadu_si512(key_tiles + 1 * tile_stride + p * 32);
    const __m512i k2 = _mm512_loadu_si512(key_tiles + 2 * tile_stride + p * 32);
    const __m512i k3 = _mm512_loadu_si512(key_tiles + 3 * tile_stride + p * 32);
    for (int r = 0; r < kScoreRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, q_rows[r] + 2 * p, sizeof(pair));
      const __m512bh qb = as_bh(_mm512_set1_epi32(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], as_bh(k0), qb);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], as_bh(k1), qb);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], as_bh(k2), qb);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], as_bh(k3), qb);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < kScoreRows; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * s_stride + c * 16, _mm512_mul_ps(acc[r][c], sc));
}

// o_rows[r][0:D] = o_rows[r] * alpha[r] + P[r] @ V for 256 / D rows (16 accumulators) over `cols` keys (even).
template <int D>
inline void accumulate_values(float* const* o_rows, const float* alpha, const uint16_t* const* p_rows,
                              const uint16_t* value_pairs, int cols) {
  constexpr int kChunks = D / 16;
  constexpr int kRows = 256 / D;
  __m512 acc[kRows][kChunks];
  for (int r = 0; r < kRows; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < kChunks; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o_rows[r] + c * 16), a);
  }
  for (int t = 0; t < cols / 2; ++t) {
    const uint16_t* v = value_pairs + static_cast<int64_t>(t) * D * 2;
    __m512i vc[kChunks];
    for (int c = 0; c < kChunks; ++c) vc[c] = _mm512_loadu_si512(v + c * 32);
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, p_rows[r] + 2 * t, sizeof(pair));
      const __m512bh pb = as_bh(_mm512_set1_epi32(pair));
      for (int c = 0; c < kChunks; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(vc[c]), pb);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(o_rows[r] + c * 16, acc[r][c]);
}

struct Scratch {
  std::vector<float> s, o, row_max, row_sum, alpha;
  std::vector<uint16_t> p;
};

template <int D>
void run_task(const Problem& pb, int64_t task, Scratch& sc) {
  const int64_t group = pb.q_heads / pb.kv_heads;
  const int64_t q_blocks = (pb.q_len + kQueryBlock - 1) / kQueryBlock;
  const int64_t b = task / (pb.kv_heads * q_blocks);
  const int64_t g = (task / q_blocks) % pb.kv_heads;
  const int64_t q0 = (task % q_blocks) * kQueryBlock;
  const int64_t nq = std::min<int64_t>(kQueryBlock, pb.q_len - q0);
  const int64_t offset = pb.k_len - pb.q_len;  // position of query 0
  const int rows = static_cast<int>(nq * group);
  // The micro-kernels take whole groups of rows; the padding rows repeat row 0 and are never written out.
  const int padded = (rows + kRowPadding - 1) / kRowPadding * kRowPadding;

  sc.s.resize(static_cast<size_t>(padded) * kKeyBlock);
  sc.p.resize(static_cast<size_t>(padded) * kKeyBlock);
  sc.o.assign(static_cast<size_t>(padded) * D, 0.0f);
  sc.row_max.assign(padded, -INFINITY);
  sc.row_sum.assign(padded, 0.0f);
  sc.alpha.resize(padded);

  // Row m is query position q0 + m / group of head g * group + m % group: neighbouring rows share positions.
  std::vector<const uint16_t*> q_rows(padded);
  std::vector<int64_t> position(padded);
  for (int m = 0; m < padded; ++m) {
    const int row = m < rows ? m : 0;
    const int64_t i = q0 + row / group;
    const int64_t h = g * group + row % group;
    q_rows[m] = pb.q + b * pb.q_sb + h * pb.q_sh + i * pb.q_sl;
    position[m] = offset + i;
  }
  const int64_t key_end = offset + q0 + nq;  // keys [0, key_end) are seen by some row
  const int64_t bg = b * pb.kv_heads + g;
  const uint16_t* kp = pb.kp + bg * pb.k_len64 * D;
  const uint16_t* vp = pb.vp + bg * pb.k_len64 * D;
  const int64_t tile_stride = 16 * D;  // elements from one tile of 16 keys to the next

  for (int64_t kb = 0; kb < key_end; kb += kKeyBlock) {
    const int cols = static_cast<int>(
        std::min<int64_t>(kKeyBlock, ((key_end - kb + kKeyGroup - 1) / kKeyGroup) * kKeyGroup));
    // Scores.
    for (int m = 0; m < padded; m += kScoreRows) {
      for (int c = 0; c < cols; c += kKeyGroup) {
        score_group(&q_rows[m], kp + ((kb + c) / 16) * tile_stride, tile_stride, D / 2, pb.scale_log2,
                    sc.s.data() + static_cast<size_t>(m) * kKeyBlock + c, kKeyBlock);
      }
    }
    // Running softmax: keys past a row's position are masked (they include the padding past k_len).
    for (int m = 0; m < padded; ++m) {
      float* s = sc.s.data() + static_cast<size_t>(m) * kKeyBlock;
      uint16_t* p = sc.p.data() + static_cast<size_t>(m) * kKeyBlock;
      const int64_t valid = std::min<int64_t>(cols, std::max<int64_t>(0, position[m] - kb + 1));
      __m512 vmax = _mm512_set1_ps(-INFINITY);
      for (int c = 0; c < cols; c += 16) {
        const __mmask16 live = valid - c >= 16 ? 0xFFFF : (valid > c ? (__mmask16)((1u << (valid - c)) - 1) : 0);
        vmax = _mm512_mask_max_ps(vmax, live, vmax, _mm512_loadu_ps(s + c));
      }
      const float block_max = _mm512_reduce_max_ps(vmax);
      const float old_max = sc.row_max[m];
      const float new_max = std::max(old_max, block_max);
      sc.alpha[m] = old_max == -INFINITY ? 0.0f : std::exp2(old_max - new_max);
      sc.row_max[m] = new_max;
      const __m512 shift = _mm512_set1_ps(new_max == -INFINITY ? 0.0f : new_max);
      __m512 vsum = _mm512_setzero_ps();
      for (int c = 0; c < cols; c += 16) {
        const __mmask16 live = valid - c >= 16 ? 0xFFFF : (valid > c ? (__mmask16)((1u << (valid - c)) - 1) : 0);
        const __m512 e = _mm512_maskz_mov_ps(live, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + c), shift)));
        vsum = _mm512_add_ps(vsum, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + c), (__m256i)_mm512_cvtneps_pbh(e));
      }
      sc.row_sum[m] = sc.row_sum[m] * sc.alpha[m] + _mm512_reduce_add_ps(vsum);
    }
    // Values.
    constexpr int kValueRows = 256 / D;
    for (int m = 0; m < padded; m += kValueRows) {
      float* o_rows[kValueRows];
      const uint16_t* p_rows[kValueRows];
      for (int r = 0; r < kValueRows; ++r) {
        o_rows[r] = sc.o.data() + static_cast<size_t>(m + r) * D;
        p_rows[r] = sc.p.data() + static_cast<size_t>(m + r) * kKeyBlock;
      }
      accumulate_values<D>(o_rows, &sc.alpha[m], p_rows, vp + (kb / 2) * D * 2, cols);
    }
  }
  // Normalise and write [B][Lq][Hq][D] in bf16 (round to nearest even).
  for (int m = 0; m < rows; ++m) {
    const int64_t i = q0 + m / group;
    const int64_t h = g * group + m % group;
    uint16_t* dst = pb.out + ((b * pb.q_len + i) * pb.q_heads + h) * D;
    const __m512 inv = _mm512_set1_ps(1.0f / sc.row_sum[m]);
    for (int c = 0; c < D; c += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(sc.o.data() + static_cast<size_t>(m) * D + c), inv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

template <int D>
void run(const Problem& pb, int threads) {
  const int64_t q_blocks = (pb.q_len + kQueryBlock - 1) / kQueryBlock;
  const int64_t tasks = pb.batch * pb.kv_heads * q_blocks;
  // Later query blocks see more keys: hand out the most expensive tasks first so the threads finish together.
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    Scratch scratch;
    for (int64_t n = next.fetch_add(1); n < tasks; n = next.fetch_add(1)) {
      const int64_t block = q_blocks - 1 - n / (pb.batch * pb.kv_heads);
      const int64_t head = n % (pb.batch * pb.kv_heads);
      run_task<D>(pb, head * q_blocks + block, scratch);
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < std::min<int64_t>(threads, tasks); ++t) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
}

}  // namespace

extern "C" {

// 0 on success, 1 for a head size this build has no kernel for.
int longrope_causal_attention_bf16(const uint16_t* q, int64_t q_sb, int64_t q_sh, int64_t q_sl, const uint16_t* kp,
                                   const uint16_t* vp, uint16_t* out, int64_t batch, int64_t q_heads,
                                   int64_t kv_heads, int64_t q_len, int64_t k_len, int64_t head_dim, float scale,
                                   int threads) {
  const int64_t k_len64 = (k_len + 63) / 64 * 64;
  const Problem pb{q, q_sb, q_sh, q_sl, kp, vp, out, batch, q_heads, kv_heads, q_len, k_len, k_len64, scale * kLog2e};
  switch (head_dim) {
    case 32: run<32>(pb, threads); return 0;
    case 64: run<64>(pb, threads); return 0;
    case 128: run<128>(pb, threads); return 0;
    case 256: run<256>(pb, threads); return 0;
    default: return 1;
  }
}

}  // extern "C"
