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
// as [NB][T] fp32 (bf16 x is widened here), and accumulates acc[T][KS] += xp^T @ tile with a
// register block of MR rows x 16 columns. The PARTS partial sums of each slice are added in part
// order, so the result does not depend on the thread count.
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "amx.h"
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

template <typename X>
int gemm_t(const X* x, int64_t T, int64_t N, const uint8_t* w, int qtype, int64_t K, float* y) {
    const BlockInfo b = block_info(qtype);
    if (b.elems == 0) return DN_E_QTYPE;
    const int64_t rb = row_bytes(qtype, K);
    if (T < 0 || N < 0 || K <= 0 || rb < 0) return DN_E_SHAPE;
    if constexpr (std::is_same_v<X, uint16_t>) {
        if (amx_active()) return gemm_t_bf16_amx(x, T, N, w, rb, qtype, K, y);
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
