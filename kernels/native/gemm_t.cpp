// y[T, K] = x[T, N] @ W[N, K] with W given as N rows of ggml blocks (dn_qmatmul_t): the
// self-conditioning input softmax(logits) @ E straight from the embedding's quantized rows, with
// no dense copy of E (1.5 GB in bf16, 3 GB in fp32 at the real model's 262144 x 2816).
//
// Legend: T activation rows, N weight rows (the reduction), K weight columns (the output width),
// KS columns per slice (one 256-value block of a K-quant), NB weight rows per tile, MR activation
// rows per register block, PARTS fixed split of N.
//
// Work: tasks (K slice, N part), spread over the threads. A task walks its rows NB at a time:
// dequantizes the NB rows' slice into fp32 (NB x KS, L1/L2-sized), packs the matching x columns
// as [NB][T] fp32 (bf16 x, on a build without bf16 dot products, is widened here), and
// accumulates acc[T][KS] += xp^T @ tile with a register block of MR rows x 16 columns. The PARTS
// partial sums of each slice are added in part order, so the result does not depend on the
// thread count.
//
// bf16 x where the build has AVX512-BF16 (and AMX is not in use): products of bf16 pairs
// (vdpbf16ps, fp32 sums), W rounded to bf16 as on the AMX tiles. A task is (group of GS slices,
// part): per chunk of NB2 rows, x's matching columns are read once as pairs (x[t][n], x[t][n+1]
// are adjacent in x) into [NB2/2][T], and each slice of the group decodes its NB2 rows into pairs
// along N (bf16.h's decode_pairs) and accumulates acc[T][KS] += xp^T . wv, MR2 rows x 32 columns
// a register block. Grouping the slices reads x once per group rather than once per slice (x is
// [C, V], 134 MB at the real vocabulary).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "amx.h"
#include "bf16.h"
#include "gemm.h"

namespace dn {
namespace {

constexpr int64_t KS = 256;
constexpr int64_t NB = 64;
constexpr int MR = 6;
constexpr int64_t PARTS = 4;

inline float xval(const float* x, int64_t i) { return x[i]; }
inline float xval(const uint16_t* x, int64_t i) { return bf16_to_f32(x[i]); }

// acc[M][ks] (row stride KS) += sum_n xp[n][M rows] * w[n][ks]  (xp row stride T).
template <int M>
void block(int64_t nb, const float* xp, int64_t T, const float* w, int64_t ks, float* acc) {
    int64_t j = 0;
#if DN_AVX2
    for (; j + 16 <= ks; j += 16) {
        __m256 c0[M], c1[M];
        for (int r = 0; r < M; ++r) {
            c0[r] = _mm256_loadu_ps(acc + r * KS + j);
            c1[r] = _mm256_loadu_ps(acc + r * KS + j + 8);
        }
        for (int64_t n = 0; n < nb; ++n) {
            const __m256 w0 = _mm256_loadu_ps(w + n * KS + j), w1 = _mm256_loadu_ps(w + n * KS + j + 8);
            for (int r = 0; r < M; ++r) {
                const __m256 xb = _mm256_broadcast_ss(xp + n * T + r);
                c0[r] = _mm256_fmadd_ps(xb, w0, c0[r]);
                c1[r] = _mm256_fmadd_ps(xb, w1, c1[r]);
            }
        }
        for (int r = 0; r < M; ++r) {
            _mm256_storeu_ps(acc + r * KS + j, c0[r]);
            _mm256_storeu_ps(acc + r * KS + j + 8, c1[r]);
        }
    }
#endif
    for (; j < ks; ++j)
        for (int r = 0; r < M; ++r) {
            float s = acc[r * KS + j];
            for (int64_t n = 0; n < nb; ++n) s += xp[n * T + r] * w[n * KS + j];
            acc[r * KS + j] = s;
        }
}

template <int M>
void block_upto(int m, int64_t nb, const float* xp, int64_t T, const float* w, int64_t ks, float* acc) {
    if constexpr (M > 1) {
        if (m < M) return block_upto<M - 1>(m, nb, xp, T, w, ks, acc);
    }
    block<M>(nb, xp, T, w, ks, acc);
}

#if DN_AVX512BF16
constexpr int MR2 = 12;     // 24 accumulators, two weight vectors and a broadcast of 32 zmm
constexpr int64_t GS = 3;   // slices per task
// Weight rows per chunk: the task's sums (GS x T x KS fp32, 768 KB at T = 256) are read and
// written once per chunk, so a longer chunk halves that traffic; 128 took the real-shape product
// from 1,346-1,395 to 1,202-1,259 ms on a Zen 4 (256 and 512: no better).
constexpr int64_t NB2 = 128;

// acc[M][KS] (row stride KS) += sum_i xp[i][M rows] . wv[i][columns < width], pairwise
// (xp row stride T, wv lines of KS pairs).
template <int M>
void block_bf16(int64_t nb2, const uint32_t* xp, int64_t T, const uint32_t* wv, int64_t width, float* acc) {
    for (int64_t j = 0; j < width; j += 32) {
        __m512 c0[M], c1[M];
        for (int r = 0; r < M; ++r) {
            c0[r] = _mm512_loadu_ps(acc + r * KS + j);
            c1[r] = _mm512_loadu_ps(acc + r * KS + j + 16);
        }
        for (int64_t i = 0; i < nb2; ++i) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wv + i * KS + j);
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wv + i * KS + j + 16);
            for (int r = 0; r < M; ++r) {
                const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp[i * T + r]);
                c0[r] = _mm512_dpbf16_ps(c0[r], xb, w0);
                c1[r] = _mm512_dpbf16_ps(c1[r], xb, w1);
            }
        }
        for (int r = 0; r < M; ++r) {
            _mm512_storeu_ps(acc + r * KS + j, c0[r]);
            _mm512_storeu_ps(acc + r * KS + j + 16, c1[r]);
        }
    }
}

template <int M>
void block_bf16_upto(int m, int64_t nb2, const uint32_t* xp, int64_t T, const uint32_t* wv, int64_t width,
                     float* acc) {
    if constexpr (M > 1) {
        if (m < M) return block_bf16_upto<M - 1>(m, nb2, xp, T, wv, width, acc);
    }
    block_bf16<M>(nb2, xp, T, wv, width, acc);
}

// Columns [n0, n0 + nb) of x [T][N] as pairs xp[i][t] = (x[t][n0 + 2i], x[t][n0 + 2i + 1]); an
// odd nb's last pair has a zero high half (never reading past n0 + nb).
void pack_pairs_t(const uint16_t* x, int64_t T, int64_t N, int64_t n0, int64_t nb, uint32_t* xp) {
    const int64_t full = nb / 2;
    for (int64_t t = 0; t < T; ++t) {
        const uint16_t* src = x + t * N + n0;
        for (int64_t i = 0; i < full; ++i) {
            uint32_t v;
            memcpy(&v, src + 2 * i, 4);
            xp[i * T + t] = v;
        }
        if (nb % 2) xp[full * T + t] = src[nb - 1];
    }
}

int gemm_t_bf16(const uint16_t* x, int64_t T, int64_t N, const uint8_t* w, int64_t rb, int qtype, int64_t K,
                float* y) {
    const int64_t slices = (K + KS - 1) / KS, groups = (slices + GS - 1) / GS, tasks = groups * PARTS;
    const int64_t per_part = (N + PARTS - 1) / PARTS;
    std::vector<float> part((size_t)(PARTS * T * K));          // [PARTS][T][K] partial sums
#pragma omp parallel if (tasks > 1)
    {
        std::vector<uint32_t> wv((size_t)(NB2 / 2 * KS)), xp((size_t)(NB2 / 2 * T));
        std::vector<float> acc((size_t)(GS * T * KS));
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t g = task / PARTS, p = task % PARTS;
            const int64_t s_lo = g * GS, s_hi = std::min(slices, s_lo + GS);
            const int64_t n_lo = std::min(N, p * per_part), n_hi = std::min(N, n_lo + per_part);
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t n0 = n_lo; n0 < n_hi; n0 += NB2) {
                const int64_t nb = std::min(NB2, n_hi - n0), nb2 = (nb + 1) / 2;
                pack_pairs_t(x, T, N, n0, nb, xp.data());
                for (int64_t s = s_lo; s < s_hi; ++s) {
                    const int64_t k0 = s * KS, ks = std::min(KS, K - k0), width = (ks + 31) / 32 * 32;
                    decode_pairs(qtype, w, rb, n0, n_hi, 2 * nb2, k0, ks, KS, wv.data());
                    float* A = acc.data() + (s - s_lo) * T * KS;
                    for (int64_t t = 0; t < T; t += MR2)
                        block_bf16_upto<MR2>((int)std::min<int64_t>(MR2, T - t), nb2, xp.data() + t, T, wv.data(),
                                             width, A + t * KS);
                }
            }
            float* dst = part.data() + p * T * K;
            for (int64_t s = s_lo; s < s_hi; ++s) {
                const int64_t k0 = s * KS, ks = std::min(KS, K - k0);
                const float* A = acc.data() + (s - s_lo) * T * KS;
                for (int64_t t = 0; t < T; ++t) memcpy(dst + t * K + k0, A + t * KS, (size_t)ks * 4);
            }
        }
    }
    add_parts(part.data(), PARTS, T * K, y);
    return DN_OK;
}
#endif  // DN_AVX512BF16

template <typename X>
int gemm_t(const X* x, int64_t T, int64_t N, const uint8_t* w, int qtype, int64_t K, float* y) {
    const BlockInfo b = block_info(qtype);
    if (b.elems == 0) return DN_E_QTYPE;
    const int64_t rb = row_bytes(qtype, K);
    if (T < 0 || N < 0 || K <= 0 || rb < 0) return DN_E_SHAPE;
    if constexpr (std::is_same_v<X, uint16_t>) {
        if (amx_active()) return gemm_t_bf16_amx(x, T, N, w, rb, qtype, K, y);
#if DN_AVX512BF16
        return gemm_t_bf16(x, T, N, w, rb, qtype, K, y);
#endif
    }
    const int64_t slices = (K + KS - 1) / KS, tasks = slices * PARTS;
    const int64_t per_part = (N + PARTS - 1) / PARTS;
    std::vector<float> part((size_t)(PARTS * T * K));          // [PARTS][T][K] partial sums
#pragma omp parallel if (tasks > 1)
    {
        std::vector<float> tile((size_t)(NB * KS)), xp((size_t)(NB * T)), acc((size_t)(T * KS));
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t s = task / PARTS, p = task % PARTS;
            const int64_t k0 = s * KS, ks = std::min(KS, K - k0);
            const int64_t n_lo = p * per_part, n_hi = std::min(N, n_lo + per_part);
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t n0 = n_lo; n0 < n_hi; n0 += NB) {
                const int64_t nb = std::min(NB, n_hi - n0);
                for (int64_t n = 0; n < nb; ++n)       // a block type's slice is whole blocks
                    dequant_range(qtype, w + (n0 + n) * rb, k0, ks, tile.data() + n * KS);
                for (int64_t n = 0; n < nb; ++n)
                    for (int64_t t = 0; t < T; ++t) xp[n * T + t] = xval(x, t * N + n0 + n);
                for (int64_t t = 0; t < T; t += MR)
                    block_upto<MR>((int)std::min<int64_t>(MR, T - t), nb, xp.data() + t, T, tile.data(), ks,
                                   acc.data() + t * KS);
            }
            float* dst = part.data() + p * T * K;
            for (int64_t t = 0; t < T; ++t) memcpy(dst + t * K + k0, acc.data() + t * KS, (size_t)ks * 4);
        }
    }
    add_parts(part.data(), PARTS, T * K, y);
    return DN_OK;
}

// IEEE float -> half, round to nearest even (as numpy's astype(float16)); overflow -> inf.
uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);           // NaN
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          // rounds past 65504: inf
    if (a < 0x38800000u) {                                               // half subnormal (or 0)
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(v * 16777216.0f));   // v / 2^-24
    }
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);                    // round the 13 dropped bits
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
#endif
}

// Scratch of one thread for transpose_group: the group's rows dequantized, per column the
// inverse scale, and the rounded quants, all row-major (loops along K vectorize).
struct TransposeScratch {
    std::vector<float> rows, id;
    std::vector<int8_t> q;
    explicit TransposeScratch(int64_t K) : rows((size_t)(32 * K)), id((size_t)K), q((size_t)(32 * K)) {}
};

// Rows [v0, v0 + 32) of W [N, K] into column block v0 / 32 of every row of out (Q8_0 [K, N]),
// column k's block scaled by the largest |value| of its 32 (gguf.quants' Q8_0, byte for byte).
void transpose_group(const uint8_t* w, int64_t rb, int qtype, int64_t K, int64_t v0, int64_t N,
                     TransposeScratch& s, uint8_t* out) {
    float* tmp = s.rows.data();
    float* id = s.id.data();
    int8_t* q = s.q.data();
    for (int r = 0; r < 32; ++r) dequant_range(qtype, w + (v0 + r) * rb, 0, K, tmp + r * K);
    const int64_t ob = N / 32 * 34;    // bytes per row of out
    for (int64_t k = 0; k < K; ++k) id[k] = 0.0f;
    for (int r = 0; r < 32; ++r)       // id = amax for now
        for (int64_t k = 0; k < K; ++k) id[k] = std::max(id[k], fabsf(tmp[r * K + k]));
    for (int64_t k = 0; k < K; ++k) {
        const float d = id[k] / 127.0f;
        const uint16_t dh = f32_to_f16(d);
        memcpy(out + k * ob + v0 / 32 * 34, &dh, 2);
        id[k] = d != 0.0f ? 1.0f / d : 0.0f;
    }
    for (int r = 0; r < 32; ++r) {
        int64_t k = 0;
#if DN_AVX2
        const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
        // roundf in 8 lanes: trunc, then a step away from 0 where the (exact) remainder is >= 0.5
        for (; k + 8 <= K; k += 8) {
            const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(tmp + r * K + k), _mm256_loadu_ps(id + k));
            const __m256 t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(x, t)), half, _CMP_GE_OQ);
            const __m256 step = _mm256_and_ps(up, _mm256_or_ps(_mm256_and_ps(x, sign), one));
            const __m256i v = _mm256_cvttps_epi32(_mm256_add_ps(t, step));
            const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            _mm_storel_epi64((__m128i*)(q + r * K + k), _mm_packs_epi16(w16, w16));
        }
#endif
        for (; k < K; ++k) q[r * K + k] = (int8_t)roundf(tmp[r * K + k] * id[k]);   // half away from 0
    }
    int64_t k = 0;
#if DN_AVX2
    for (; k + 8 <= K; k += 8)            // 8 x 8 bytes at a time: rows 8g.. of columns k..k+7
        for (int g = 0; g < 4; ++g) {
            __m128i a[8];
            for (int i = 0; i < 8; ++i) a[i] = _mm_loadl_epi64((const __m128i*)(q + (8 * g + i) * K + k));
            for (int i = 0; i < 4; ++i) a[i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);   // rows 2i, 2i+1
            const __m128i b0 = _mm_unpacklo_epi16(a[0], a[1]), b1 = _mm_unpackhi_epi16(a[0], a[1]);
            const __m128i b2 = _mm_unpacklo_epi16(a[2], a[3]), b3 = _mm_unpackhi_epi16(a[2], a[3]);
            // b0: columns 0-3 of rows 0-3 (4 bytes each), b1: columns 4-7; b2, b3 the same of rows 4-7
            const __m128i c[4] = {_mm_unpacklo_epi32(b0, b2), _mm_unpackhi_epi32(b0, b2),
                                  _mm_unpacklo_epi32(b1, b3), _mm_unpackhi_epi32(b1, b3)};
            for (int j = 0; j < 4; ++j) {      // c[j]: column 2j's 8 rows, then column 2j + 1's
                _mm_storel_epi64((__m128i*)(out + (k + 2 * j) * ob + v0 / 32 * 34 + 2 + 8 * g), c[j]);
                _mm_storel_epi64((__m128i*)(out + (k + 2 * j + 1) * ob + v0 / 32 * 34 + 2 + 8 * g),
                                 _mm_unpackhi_epi64(c[j], c[j]));
            }
        }
#endif
    for (; k < K; ++k) {
        uint8_t* b = out + k * ob + v0 / 32 * 34 + 2;
        for (int r = 0; r < 32; ++r) b[r] = (uint8_t)q[r * K + k];
    }
}

}  // namespace

void add_parts(const float* part, int64_t parts, int64_t n, float* y) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
        float s = part[i];
        for (int64_t p = 1; p < parts; ++p) s += part[p * n + i];
        y[i] = s;
    }
}

}  // namespace dn

DN_API int dn_qmatmul_t(const float* x, int64_t T, int64_t N, const uint8_t* w, int qtype, int64_t K,
                        float* y) {
    return dn::gemm_t(x, T, N, w, qtype, K, y);
}

DN_API int dn_qmatmul_t_bf16(const uint16_t* x, int64_t T, int64_t N, const uint8_t* w, int qtype,
                             int64_t K, float* y) {
    return dn::gemm_t(x, T, N, w, qtype, K, y);
}

// out = W^T requantized: Q8_0 [K, N] from W [N, K] of any type dn_dequantize takes, N a multiple
// of 32; gguf.quants' Q8_0 rounding (d = max|v| / 127 stored as f16, q = round-half-away(v / d)),
// byte for byte. The self-conditioning product's E^T for the int8 kernels.
DN_API int dn_transpose_q8_0(const uint8_t* w, int qtype, int64_t N, int64_t K, uint8_t* out) {
    const int64_t rb = dn::row_bytes(qtype, K);
    if (!dn::block_info(qtype).elems) return DN_E_QTYPE;
    if (rb < 0) return DN_E_SHAPE;
    if (N < 0 || N % 32 || K <= 0) return DN_E_SHAPE;
#pragma omp parallel if (N > 32)
    {
        dn::TransposeScratch scratch(K);
#pragma omp for schedule(dynamic, 8)
        for (int64_t g = 0; g < N / 32; ++g) dn::transpose_group(w, rb, qtype, K, 32 * g, N, scratch, out);
    }
    return DN_OK;
}
