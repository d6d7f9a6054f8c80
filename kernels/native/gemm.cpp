// Quantized matmul y = x @ W^T that never materialises a dequantized W.
//
// Legend: T activation rows, K in-features, N weight rows (out-features); NR weight rows per
// tile, KB values of K per slice, MR activation rows per register block (a "panel"), TB
// activation rows per pass.
//
// Work is split over tiles of NR weight rows (OpenMP, one tile per task). For each tile and each
// KB-wide slice of K, the weight rows are dequantized once into an L1/L2-sized scratch,
// transposed to [KB][NR] so the register kernel loads NR consecutive output columns, and reused
// by every activation row of the pass: dequantization is paid once per TB rows instead of once
// per row. The activations are packed once per pass into panels [K][MR] so the kernel's
// broadcasts read consecutive floats. Partial sums stay in a per-thread [TB][NR] buffer.
#include "gemm.h"

#include "amx.h"

#include <stdlib.h>
#include <string.h>
#if defined(_WIN32)
#include <malloc.h>
#endif

#include <algorithm>
#include <vector>

#include "bf16.h"
#include "blocks.h"

namespace dn {

#if defined(__AVX512F__)
constexpr int NR = 32;   // two zmm per row: 24 accumulators + 2 weight vectors of 32 registers
constexpr int MR = 12;
#else
constexpr int NR = 16;   // two ymm per row: 12 accumulators + 2 weight vectors + 1 broadcast
constexpr int MR = 6;
#endif
constexpr int64_t KB = 256;

constexpr int64_t TB = 512;

int64_t row_bytes(int qtype, int64_t K) {
    const BlockInfo b = block_info(qtype);
    if (b.elems == 0 || K % b.elems != 0) return -1;
    return K / b.elems * b.bytes;
}

namespace {

struct Scratch {
    float* rows;   // [NR][KB] dequantized weight rows
    float* wt;     // [KB][NR] the same, transposed
    float* acc;    // [TB][NR] partial sums
    void* base;
    explicit Scratch(int64_t tb) {
        const size_t n = (size_t)(2 * NR * KB + tb * NR);
#if defined(_WIN32)
        base = _aligned_malloc(n * sizeof(float), 64);
#else
        base = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
#endif
        rows = (float*)base;
        wt = rows + NR * KB;
        acc = wt + NR * KB;
    }
#if defined(_WIN32)
    ~Scratch() { _aligned_free(base); }
#else
    ~Scratch() { free(base); }
#endif
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
};

// rows [NR][stride] (first kb columns) -> wt [kb][NR]; 32-bit elements moved bit for bit, so the
// bf16 path uses it on packed bf16 pairs too.
void transpose_tile(const float* rows, int64_t kb, float* wt, int64_t stride = KB) {
    int64_t k = 0;
#if DN_AVX2
    for (; k + 8 <= kb; k += 8) {
        for (int rb = 0; rb < NR; rb += 8) {
            __m256 r[8], t[8], s[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows + (rb + i) * stride + k);
            for (int i = 0; i < 8; i += 2) {
                t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
            }
            for (int i = 0; i < 8; i += 4) {
                s[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
                s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
                s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
                s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
            for (int j = 0; j < 4; ++j) {
                _mm256_storeu_ps(wt + (k + j) * NR + rb, _mm256_permute2f128_ps(s[j], s[j + 4], 0x20));
                _mm256_storeu_ps(wt + (k + j + 4) * NR + rb, _mm256_permute2f128_ps(s[j], s[j + 4], 0x31));
            }
        }
    }
#endif
    for (; k < kb; ++k)
        for (int r = 0; r < NR; ++r) wt[k * NR + r] = rows[r * stride + k];
}

// acc[M][NR] (+)= xp[kb][MR] (first M columns) @ wt[kb][NR]
template <int M>
void ukernel(int64_t kb, const float* xp, const float* wt, float* acc, bool add) {
#if defined(__AVX512F__)
    __m512 c0[M], c1[M];
    for (int r = 0; r < M; ++r) {
        c0[r] = add ? _mm512_load_ps(acc + r * NR) : _mm512_setzero_ps();
        c1[r] = add ? _mm512_load_ps(acc + r * NR + 16) : _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < kb; ++k) {
        const __m512 w0 = _mm512_load_ps(wt + k * NR), w1 = _mm512_load_ps(wt + k * NR + 16);
        for (int r = 0; r < M; ++r) {
            const __m512 xb = _mm512_set1_ps(xp[k * MR + r]);
            c0[r] = _mm512_fmadd_ps(xb, w0, c0[r]);
            c1[r] = _mm512_fmadd_ps(xb, w1, c1[r]);
        }
    }
    for (int r = 0; r < M; ++r) {
        _mm512_store_ps(acc + r * NR, c0[r]);
        _mm512_store_ps(acc + r * NR + 16, c1[r]);
    }
#elif DN_AVX2
    __m256 c0[M], c1[M];
    for (int r = 0; r < M; ++r) {
        c0[r] = add ? _mm256_load_ps(acc + r * NR) : _mm256_setzero_ps();
        c1[r] = add ? _mm256_load_ps(acc + r * NR + 8) : _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < kb; ++k) {
        const __m256 w0 = _mm256_load_ps(wt + k * NR), w1 = _mm256_load_ps(wt + k * NR + 8);
        for (int r = 0; r < M; ++r) {
            const __m256 xb = _mm256_broadcast_ss(xp + k * MR + r);
            c0[r] = _mm256_fmadd_ps(xb, w0, c0[r]);
            c1[r] = _mm256_fmadd_ps(xb, w1, c1[r]);
        }
    }
    for (int r = 0; r < M; ++r) {
        _mm256_store_ps(acc + r * NR, c0[r]);
        _mm256_store_ps(acc + r * NR + 8, c1[r]);
    }
#else
    // Portable kernel: fixed-width inner loops the compiler vectorizes (NEON on ARM, SSE on x86).
    float c[M][NR];
    for (int r = 0; r < M; ++r)
        for (int j = 0; j < NR; ++j) c[r][j] = add ? acc[r * NR + j] : 0.0f;
    for (int64_t k = 0; k < kb; ++k) {
        const float* w = wt + k * NR;
        for (int r = 0; r < M; ++r) {
            const float xv = xp[k * MR + r];
            for (int j = 0; j < NR; ++j) c[r][j] += xv * w[j];
        }
    }
    for (int r = 0; r < M; ++r)
        for (int j = 0; j < NR; ++j) acc[r * NR + j] = c[r][j];
#endif
}

template <int M>
void ukernel_upto(int m, int64_t kb, const float* xp, const float* wt, float* acc, bool add) {
    if constexpr (M > 1) {
        if (m < M) return ukernel_upto<M - 1>(m, kb, xp, wt, acc, add);
    }
    ukernel<M>(kb, xp, wt, acc, add);
}

// x rows [t0, t0+tb) -> panels of MR rows, xp[panel][K][MR]; rows past the end are left unset
// (the kernel for a short panel reads only its first rows).
void pack_x(const float* x, int64_t K, int64_t t0, int64_t tb, float* xp) {
    const int64_t panels = (tb + MR - 1) / MR;
#pragma omp parallel for schedule(static) if (tb * K > 65536)
    for (int64_t p = 0; p < panels; ++p) {
        const int m = (int)std::min<int64_t>(MR, tb - p * MR);
        float* dst = xp + p * K * MR;
        for (int r = 0; r < m; ++r) {
            const float* src = x + (t0 + p * MR + r) * K;
            for (int64_t k = 0; k < K; ++k) dst[k * MR + r] = src[k];
        }
    }
}

// One tile of NR weight rows against the packed activation rows of this pass.
void tile(const float* xp, int64_t t0, int64_t tb, int64_t K, const uint8_t* w, int64_t rb, int qtype,
          int64_t n0, int64_t N, float* y, Scratch& s) {
    const int nr = (int)std::min<int64_t>(NR, N - n0);
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
        const int64_t kb = std::min(KB, K - k0);
        for (int r = 0; r < nr; ++r) dequant_range(qtype, w + (n0 + r) * rb, k0, kb, s.rows + r * KB);
        for (int r = nr; r < NR; ++r) memset(s.rows + r * KB, 0, (size_t)kb * sizeof(float));
        transpose_tile(s.rows, kb, s.wt);
        for (int64_t t = 0; t < tb; t += MR) {
            const int m = (int)std::min<int64_t>(MR, tb - t);
            ukernel_upto<MR>(m, kb, xp + t * K + k0 * MR, s.wt, s.acc + t * NR, k0 > 0);
        }
    }
    for (int64_t t = 0; t < tb; ++t)
        memcpy(y + (t0 + t) * N + n0, s.acc + t * NR, (size_t)nr * sizeof(float));
}

#if DN_AVX512BF16
// --- bf16 path: the same tiles, with products of bf16 pairs (vdpbf16ps, fp32 accumulation) ------
// A "pair" is two bf16 values adjacent along K packed in 32 bits (low half first), so a K-slice
// of kb values is kb/2 pairs. xp: panels [K/2][MR] of pairs; wt: [kb/2][NR] pairs. One
// vdpbf16ps adds x[k]*w[k] + x[k+1]*w[k+1] to each of 16 fp32 lanes: twice the products of an
// fp32 FMA per instruction, from half the bytes.

// x rows [t0, t0+tb) of bf16 -> panels xp[panel][K/2][MR] of pairs.
void pack_x_bf16(const uint16_t* x, int64_t K, int64_t t0, int64_t tb, uint32_t* xp) {
    const int64_t panels = (tb + MR - 1) / MR, K2 = K / 2;
#pragma omp parallel for schedule(static) if (tb * K > 65536)
    for (int64_t p = 0; p < panels; ++p) {
        const int m = (int)std::min<int64_t>(MR, tb - p * MR);
        uint32_t* dst = xp + p * K2 * MR;
        for (int r = 0; r < m; ++r) {
            const uint16_t* src = x + (t0 + p * MR + r) * K;
            for (int64_t k = 0; k < K2; ++k) memcpy(dst + k * MR + r, src + 2 * k, 4);
        }
    }
}

// acc[M][NR] (+)= xp[kb2][MR] (first M columns) . wt[kb2][NR], pairwise.
template <int M>
void ukernel_bf16(int64_t kb2, const uint32_t* xp, const uint32_t* wt, float* acc, bool add) {
    __m512 c0[M], c1[M];
    for (int r = 0; r < M; ++r) {
        c0[r] = add ? _mm512_load_ps(acc + r * NR) : _mm512_setzero_ps();
        c1[r] = add ? _mm512_load_ps(acc + r * NR + 16) : _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < kb2; ++k) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512(wt + k * NR);
        const __m512bh w1 = (__m512bh)_mm512_load_si512(wt + k * NR + 16);
        for (int r = 0; r < M; ++r) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp[k * MR + r]);
            c0[r] = _mm512_dpbf16_ps(c0[r], xb, w0);
            c1[r] = _mm512_dpbf16_ps(c1[r], xb, w1);
        }
    }
    for (int r = 0; r < M; ++r) {
        _mm512_store_ps(acc + r * NR, c0[r]);
        _mm512_store_ps(acc + r * NR + 16, c1[r]);
    }
}

template <int M>
void ukernel_bf16_upto(int m, int64_t kb2, const uint32_t* xp, const uint32_t* wt, float* acc, bool add) {
    if constexpr (M > 1) {
        if (m < M) return ukernel_bf16_upto<M - 1>(m, kb2, xp, wt, acc, add);
    }
    ukernel_bf16<M>(kb2, xp, wt, acc, add);
}

// One tile of NR weight rows: each K-slice is decoded to bf16 pairs (first half of s.wt; bf16.h),
// transposed to [kb/2][NR] (second half of s.wt).
void tile_bf16(const uint32_t* xp, int64_t t0, int64_t tb, int64_t K, const uint8_t* w, int64_t rb,
               int qtype, int64_t n0, int64_t N, float* y, Scratch& s) {
    const int nr = (int)std::min<int64_t>(NR, N - n0);
    uint32_t* pairs = (uint32_t*)s.wt;                 // [NR][KB/2]
    uint32_t* wt = pairs + NR * KB / 2;                // [KB/2][NR]
    const int64_t K2 = K / 2;
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
        const int64_t kb = std::min(KB, K - k0), kb2 = kb / 2;
        for (int r = 0; r < nr; ++r)    // writes up to kb rounded up to 16 values: within the row
            decode_span(qtype, w + (n0 + r) * rb, k0, kb, kb, (uint16_t*)(pairs + r * (KB / 2)));
        for (int r = nr; r < NR; ++r) memset(pairs + r * (KB / 2), 0, (size_t)kb2 * 4);
        transpose_tile((const float*)pairs, kb2, (float*)wt, KB / 2);
        for (int64_t t = 0; t < tb; t += MR) {
            const int m = (int)std::min<int64_t>(MR, tb - t);
            ukernel_bf16_upto<MR>(m, kb2, xp + t * K2 + k0 / 2 * MR, wt, s.acc + t * NR, k0 > 0);
        }
    }
    for (int64_t t = 0; t < tb; ++t)
        memcpy(y + (t0 + t) * N + n0, s.acc + t * NR, (size_t)nr * sizeof(float));
}
#endif  // DN_AVX512BF16

}  // namespace

// The pass/tile loop both precisions share: x packed TB rows at a time (`pack(t0, tb, xp)`,
// `per_row` packed elements a row), then tiles of NR weight rows spread over the threads
// (`run(xp, t0, tb, n0, scratch)`).
template <typename Packed, typename Pack, typename Run>
void passes(int64_t T, int64_t N, int64_t per_row, Pack pack, Run run) {
    const int64_t tiles = (N + NR - 1) / NR;
    std::vector<Packed> xp((size_t)((std::min(T, TB) + MR - 1) / MR * MR * per_row));
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
        const int64_t tb = std::min(TB, T - t0);
        pack(t0, tb, xp.data());
#pragma omp parallel if (tiles > 1)
        {
            Scratch s(tb);
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < tiles; ++i) run(xp.data(), t0, tb, i * NR, s);
        }
    }
}

int gemm(const float* x, int64_t T, int64_t K, const uint8_t* w, int qtype, int64_t N, float* y) {
    if (block_info(qtype).elems == 0) return DN_E_QTYPE;
    const int64_t rb = row_bytes(qtype, K);
    if (T < 0 || N < 0 || K <= 0 || rb < 0) return DN_E_SHAPE;
    passes<float>(T, N, K, [&](int64_t t0, int64_t tb, float* xp) { pack_x(x, K, t0, tb, xp); },
                  [&](const float* xp, int64_t t0, int64_t tb, int64_t n0, Scratch& s) {
                      tile(xp, t0, tb, K, w, rb, qtype, n0, N, y, s);
                  });
    return DN_OK;
}

int gemm_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* w, int qtype, int64_t N, float* y) {
    if (block_info(qtype).elems == 0) return DN_E_QTYPE;
    const int64_t rb = row_bytes(qtype, K);
    if (T < 0 || N < 0 || K <= 0 || K % 2 || rb < 0) return DN_E_SHAPE;
    if (amx_active()) return gemm_bf16_amx(x, T, K, w, rb, qtype, N, y);
#if DN_AVX512BF16
    passes<uint32_t>(T, N, K / 2,
                     [&](int64_t t0, int64_t tb, uint32_t* xp) { pack_x_bf16(x, K, t0, tb, xp); },
                     [&](const uint32_t* xp, int64_t t0, int64_t tb, int64_t n0, Scratch& s) {
                         tile_bf16(xp, t0, tb, K, w, rb, qtype, n0, N, y, s);
                     });
    return DN_OK;
#else
    // No bf16 dot product on this build: widen x and use the fp32 kernel (weights unrounded).
    std::vector<float> xf((size_t)(T * K));
    for (int64_t i = 0; i < T * K; ++i) xf[i] = bf16_to_f32(x[i]);
    return gemm(xf.data(), T, K, w, qtype, N, y);
#endif
}

}  // namespace dn

DN_API int dn_has_bf16(void) { return DN_AVX512BF16; }

DN_API int dn_qmatmul_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* w, int qtype,
                           int64_t N, float* y) {
    return dn::gemm_bf16(x, T, K, w, qtype, N, y);
}

DN_API int dn_qmatmul(const float* x, int64_t T, int64_t K, const uint8_t* w, int qtype, int64_t N,
                      float* y) {
    return dn::gemm(x, T, K, w, qtype, N, y);
}
