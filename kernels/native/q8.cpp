// Int8 products on the quantized blocks: dn_qmatmul_q8 and dn_moe_q8 (and their bf16-x twins).
//
// Legend: T activation rows, K in-features, N weight rows, G = 32 values per group; a "quad" is
// four int8/uint8 values adjacent along K packed in 32 bits, the operand of vpdpbusd (AVX512-VNNI)
// or of vpmaddubsw + vpmaddwd (AVX2, see ukernel_q8).
//
// The activations are quantized per row and per group of 32 (as llama.cpp's Q8_0):
// x[t][k] ~ dx[t][g] * xq[t][k] with dx = max|x| / 127 and xq = round-to-even(x * 127 / max|x|).
// Every supported weight type is, per group of 32, an unsigned integer u with one scale and one
// offset:  w = dl * u - ml  (Q4_K: u the 4-bit quant, dl = d*sc, ml = dmin*m; Q5_0: u the 5-bit
// quant, dl = d, ml = 16 d; Q8_0: u = q + 128, dl = d, ml = 128 d). Q6_K has a scale per 16
// values, so its groups are halves of 16 (u the 6-bit quant, dl = d*sc, ml = 32 d*sc), two per
// group of x. So a weight group's contribution is
//   sum_k w[k] x[k] = dx * (dl * sum_k u[k] xq[k]) - ml * (dx * sum_k xq[k]),
// an exact integer dot product (vpdpbusd: uint8 x int8, four products into each int32 lane) and
// float terms. Where the offset is a whole number o of scales (ml = o dl: Q5_0, Q8_0, Q6_K) it
// stays in the integers: the dot product starts from zx = -o * sum_k xq[k], computed with x,
// and the group adds dx * dl * (sum_k (u[k] - o) xq[k]), one float term from the exact signed
// sum. Q4_K's ml is not, so it adds ml * sx with sx = dx * sum_k xq[k]. The result equals
// float64(dequantized W) @ (dx * xq) up to fp32 rounding of those terms; the test oracle
// computes exactly that.
//
// The weights are never decoded to floats: per tile of 16 rows and slice of 8 groups, the quants
// are unpacked to bytes, transposed so one zmm (two ymm on AVX2) holds a quad of each of the 16
// rows (Q4_K on VNNI: straight from the raw bytes, prepare_q4_k), and reused by every activation
// row (broadcast quads of x); q8_tile.h does that, q8_act.cpp the rounding of x. The rounding of
// x to int8 is the price: a coarser product than bf16's (relative error up to 1/254 of a group's
// largest value per element).
#include <string.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "q8.h"

#include "blocks.h"
#include "gemm.h"
#include "q8_tile.h"

#if defined(__GNUC__) && !defined(__clang__)
#define DN_UNROLL(n) _Pragma(DN_STR(GCC unroll n))
#elif defined(__clang__)
#define DN_UNROLL(n) _Pragma(DN_STR(unroll n))
#else
#define DN_UNROLL(n)
#endif
#define DN_STR(x) #x

namespace dn {
namespace {

using namespace q8;
#if DN_VNNI
constexpr int MR8 = 8;         // activation rows per register block
// The same for Q6_K, whose two halves per group keep three accumulators per row: on a Zen 4 its
// head-shaped product (256 x 2816 x 32768) ran 6-8% faster with 4 rows than with 8 (5 and 6 in
// between, 3 and 7 slower); for the one-scale types 4 or 6 rows were no faster than 8
constexpr int MRH = 4;
#else
// AVX2 (and the portable loops): 16 ymm registers hold, per activation row, an fp32 sum and an
// int32 sum (and Q6_K's half sum), plus a run's weight vectors, a 16-bit sum and a broadcast
constexpr int MR8 = 4;
constexpr int MRH = 3;
#endif
constexpr int64_t TB8 = 512;   // activation rows per pass
constexpr int64_t KC = 64;     // groups per chunk of a long K (2,048 values: 512 KB of 256 rows)

#if DN_AVX2 && !DN_VNNI
// An empty asm that claims to change v: the compiler has to form v there, in a register, so the
// row sums are added in program order. Left free, GCC formed every product of a group first and
// spilled them to the stack (Q8_0's one-quad runs: 32 of them for 4 rows), which cost 1.1x there;
// the other types' longer runs were no faster pinned.
inline void pin(__m256i& v) {
#if defined(__GNUC__) || defined(__clang__)
    __asm__("" : "+x"(v));
#else
    (void)v;
#endif
}
#endif

#if DN_VNNI
// s + (u8 quads of w) . (the s8 quad at q, broadcast): vpdpbusd with the quad as an embedded
// broadcast memory operand (compilers emit a separate vpbroadcastd for the intrinsic, one more
// vector op per product on the same ports).
inline __m512i dpbusd_bcast(__m512i s, __m512i w, const int8_t* q) {
#if defined(__GNUC__)
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(s) : "v"(w), "m"(*(const int32_t*)q));
    return s;
#else
    int32_t v;
    memcpy(&v, q, 4);
    return _mm512_dpbusd_epi32(s, w, _mm512_set1_epi32(v));
#endif
}
#endif

// acc[M][16] (+)= the tile's groups against activation rows xq[M] (row stride K bytes), whose
// scales dx have row stride `gs`. Z (the integer offset, with H weight groups per group of x):
// the dot products start from zx (row stride H gs); else (Q4_K, H = 1) ml * sx is subtracted.
// U is the largest quant; P says every xq is >= 0 (only the AVX2 kernel makes use of it).
template <int M, int H, bool Z, int U, bool P = false>
void ukernel_q8(int64_t ng, const Tile& tl, const int8_t* xq, int64_t K, const float* dx, const float* sx,
                const int32_t* zx, int64_t gs, float* acc, bool add) {
    static_assert(Z || H == 1, "halves come with an integer offset (Q6_K)");
    constexpr int QH = 8 / H;   // quads per weight group
#if DN_VNNI
    __m512 c[M];
    for (int t = 0; t < M; ++t) c[t] = add ? _mm512_load_ps(acc + t * NR8) : _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        __m512 f[M];      // Z: sum over halves of dl * (signed dot product), before dx
        DN_UNROLL(2)
        for (int h = 0; h < H; ++h) {
            __m512i s[M];
            for (int t = 0; t < M; ++t)
                s[t] = Z ? _mm512_set1_epi32(zx[(t * gs + g) * H + h]) : _mm512_setzero_si512();
            DN_UNROLL(8)
            for (int j = h * QH; j < (h + 1) * QH; ++j) {
                const __m512i w = _mm512_load_si512(tl.quads[g * 8 + j]);
                for (int t = 0; t < M; ++t) s[t] = dpbusd_bcast(s[t], w, xq + t * K + g * G + 4 * j);
            }
            const __m512 dl = _mm512_load_ps(tl.dl[g * H + h]);
            if constexpr (Z) {
                for (int t = 0; t < M; ++t)
                    f[t] = h == 0 ? _mm512_mul_ps(_mm512_cvtepi32_ps(s[t]), dl)
                                  : _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), dl, f[t]);
            } else {
                const __m512 ml = _mm512_load_ps(tl.ml[g]);
                for (int t = 0; t < M; ++t) {
                    const __m512 scale = _mm512_mul_ps(dl, _mm512_set1_ps(dx[t * gs + g]));
                    c[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), scale, c[t]);
                    c[t] = _mm512_fnmadd_ps(ml, _mm512_set1_ps(sx[t * gs + g]), c[t]);
                }
            }
        }
        if constexpr (Z)
            for (int t = 0; t < M; ++t) c[t] = _mm512_fmadd_ps(f[t], _mm512_set1_ps(dx[t * gs + g]), c[t]);
    }
    for (int t = 0; t < M; ++t) _mm512_store_ps(acc + t * NR8, c[t]);
#elif DN_AVX2
    // vpmaddubsw (uint8 x int8, pairs summed into saturating int16) then vpmaddwd by ones (pairs of
    // those into int32): exact while a 16-bit sum stays below 2^15. One pair of products is at
    // most 2 * 127 * U, so LS lines (quads) of them may be added in 16 bits before widening. Q8_0
    // (U = 255) would overflow even one pair, so its quants are used signed (u ^ 0x80 = q, the
    // offset already in: the sum starts at 0, not zx) with the sign trick: |q| * (x * sign q);
    // where x >= 0 throughout (P: the self-conditioning's probabilities) x's quads are the unsigned
    // operand and q the signed one, a pair at most 2 * 127 * 128 in magnitude, with no sign trick.
    constexpr bool S = U > 127;
    static_assert(!P || S, "x as the unsigned operand is for Q8_0's signed quants");
    constexpr int LS = S ? 1 : 32767 / (2 * 127 * U);
    static_assert(LS >= 1 && QH % (LS < QH ? LS : QH) == 0, "whole runs of lines per weight group");
    constexpr int L = LS < QH ? LS : QH;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int o = 0; o < NR8; o += 8) {          // the tile's two halves of 8 rows, one ymm each
        __m256 c[M];
        for (int t = 0; t < M; ++t) c[t] = add ? _mm256_load_ps(acc + t * NR8 + o) : _mm256_setzero_ps();
        for (int64_t g = 0; g < ng; ++g) {
            __m256 f[M];      // Z: sum over halves of dl * (signed dot product), before dx
            DN_UNROLL(2)
            for (int h = 0; h < H; ++h) {
                __m256i s[M];
                for (int t = 0; t < M; ++t)
                    s[t] = Z && !S ? _mm256_set1_epi32(zx[(t * gs + g) * H + h]) : _mm256_setzero_si256();
                DN_UNROLL(8)
                for (int j0 = h * QH; j0 < (h + 1) * QH; j0 += L) {
                    // the run's L weight vectors stay in registers while each row adds its products
                    // (row by row: one 16-bit sum live, not M, which AVX2's 16 registers cannot hold)
                    __m256i w[L], aw[L];
                    for (int j = 0; j < L; ++j) {
                        w[j] = _mm256_load_si256((const __m256i*)&tl.quads[g * 8 + j0 + j][o]);
                        if constexpr (S) w[j] = _mm256_xor_si256(w[j], _mm256_set1_epi8((char)0x80));
                        aw[j] = S && !P ? _mm256_abs_epi8(w[j]) : w[j];
                    }
                    DN_UNROLL(8)
                    for (int t = 0; t < M; ++t) {
                        const int8_t* xt = xq + t * K + g * G + 4 * j0;
                        __m256i p = _mm256_setzero_si256();
                        for (int j = 0; j < L; ++j) {
                            int32_t q;
                            memcpy(&q, xt + 4 * j, 4);
                            __m256i xb = _mm256_set1_epi32(q);
                            if constexpr (P) {
                                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(xb, w[j]));
                            } else {
                                if constexpr (S) xb = _mm256_sign_epi8(xb, w[j]);
                                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(aw[j], xb));
                            }
                        }
                        s[t] = _mm256_add_epi32(s[t], _mm256_madd_epi16(p, ones));
                        if constexpr (S) pin(s[t]);
                    }
                }
                const __m256 dl = _mm256_load_ps(tl.dl[g * H + h] + o);
                if constexpr (Z) {
                    for (int t = 0; t < M; ++t)
                        f[t] = h == 0 ? _mm256_mul_ps(_mm256_cvtepi32_ps(s[t]), dl)
                                      : _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), dl, f[t]);
                } else {
                    const __m256 ml = _mm256_load_ps(tl.ml[g] + o);
                    for (int t = 0; t < M; ++t) {
                        const __m256 scale = _mm256_mul_ps(dl, _mm256_set1_ps(dx[t * gs + g]));
                        c[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), scale, c[t]);
                        c[t] = _mm256_fnmadd_ps(ml, _mm256_set1_ps(sx[t * gs + g]), c[t]);
                    }
                }
            }
            if constexpr (Z)
                for (int t = 0; t < M; ++t) c[t] = _mm256_fmadd_ps(f[t], _mm256_set1_ps(dx[t * gs + g]), c[t]);
        }
        for (int t = 0; t < M; ++t) _mm256_store_ps(acc + t * NR8 + o, c[t]);
    }
#else
    for (int t = 0; t < M; ++t) {
        float* a = acc + t * NR8;
        if (!add)
            for (int r = 0; r < NR8; ++r) a[r] = 0.0f;
        for (int64_t g = 0; g < ng; ++g) {
            const int8_t* x = xq + t * K + g * G;
            for (int r = 0; r < NR8; ++r) {
                float f = 0.0f;
                for (int h = 0; h < H; ++h) {
                    int32_t s = Z ? zx[(t * gs + g) * H + h] : 0;
                    for (int j = h * QH; j < (h + 1) * QH; ++j) {
                        uint8_t u[4];
                        memcpy(u, &tl.quads[g * 8 + j][r], 4);
                        for (int i = 0; i < 4; ++i) s += (int32_t)u[i] * x[4 * j + i];
                    }
                    if (Z) {
                        f = (float)s * tl.dl[g * H + h][r] + f;
                    } else {
                        const float scale = tl.dl[g][r] * dx[t * gs + g];
                        a[r] = (float)s * scale + a[r];
                        a[r] = a[r] - tl.ml[g][r] * sx[t * gs + g];
                    }
                }
                if (Z) a[r] = f * dx[t * gs + g] + a[r];
            }
        }
    }
#endif
}

template <int M, int H, bool Z, int U, bool P = false>
void ukernel_q8_upto(int m, int64_t ng, const Tile& tl, const int8_t* xq, int64_t K, const float* dx,
                     const float* sx, const int32_t* zx, int64_t gs, float* acc, bool add) {
    if constexpr (M > 1) {
        if (m < M) return ukernel_q8_upto<M - 1, H, Z, U, P>(m, ng, tl, xq, K, dx, sx, zx, gs, acc, add);
    }
    ukernel_q8<M, H, Z, U, P>(ng, tl, xq, K, dx, sx, zx, gs, acc, add);
}

#if DN_AVX2 && !DN_VNNI
// Whether none of the n bytes at q is negative (stops at the first that is).
bool nonnegative(const int8_t* q, int64_t n) {
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(q + i));
        for (int j = 32; j < 128; j += 32) v = _mm256_or_si256(v, _mm256_loadu_si256((const __m256i*)(q + i + j)));
        if (_mm256_movemask_epi8(v)) return false;
    }
    for (; i < n; ++i)
        if (q[i] < 0) return false;
    return true;
}
#endif

}  // namespace

// The activations of one chunk of groups [c0, c0 + cg) of rows [t0, t0 + tb): either views of
// the whole rows (one chunk covers K) or a contiguous copy, so that a long K's chunk stays in
// cache for every tile (rows K bytes apart would each sit on a page of their own).
struct Chunk {
    const int8_t* xq;
    const float* dx;
    const float* sx;
    const int32_t* zx;
    int64_t groups;    // groups per row here (the row stride of dx and sx; xq's is groups * G)
};

int gemm_q8(const int8_t* xq, const float* dx, const float* sx, const int32_t* zx, int64_t T, int64_t K,
            const uint8_t* w, int qtype, int64_t N, float* y) {
    if (!q8_type(qtype)) return DN_E_QTYPE;
    const int64_t rb = row_bytes(qtype, K);
    if (T < 0 || N < 0 || K <= 0 || K % G || rb < 0) return DN_E_SHAPE;
    const int64_t tiles = (N + NR8 - 1) / NR8, groups = K / G;
    const int h = halves(qtype);
    const bool z = q8_offset(qtype) != 0;
#if DN_AVX2 && !DN_VNNI
    const bool pos = qtype == DN_Q8_0 && nonnegative(xq, T * K);   // ukernel_q8's P
#else
    const bool pos = false;
#endif
    // A long K (the self-conditioning product runs over the vocabulary) goes KC groups at a time,
    // every tile through one chunk before the next; a tile's sums wait in y between chunks (fp32,
    // so the additions and their order are those of a single pass).
    const int64_t kc = groups <= 2 * KC ? groups : KC;
    const bool copy = kc < groups;
    const int64_t cbt = copy ? std::min(TB8, T) : 0;
    std::vector<int8_t> cxq((size_t)(cbt * kc * G));
    std::vector<float> cdx((size_t)(cbt * kc)), csx(sx ? (size_t)(cbt * kc) : 0);
    std::vector<int32_t> czx(zx ? (size_t)(cbt * kc * h) : 0);
    for (int64_t t0 = 0; t0 < T; t0 += TB8) {
        const int64_t tb = std::min(TB8, T - t0);
#pragma omp parallel if (tiles > 1)
        {
            std::unique_ptr<Tile> tile(new Tile);                 // C++17: aligned new
            std::vector<Sums> sums((size_t)tb);                    // [tb][16] partial sums
            Tile* tl = tile.get();
            float* acc = sums[0].v;
            for (int64_t c0 = 0; c0 < groups; c0 += kc) {
                const int64_t cg = std::min(kc, groups - c0);
                Chunk c{xq + t0 * K, dx + t0 * groups, sx ? sx + t0 * groups : nullptr,
                        zx ? zx + t0 * groups * h : nullptr, groups};
                if (copy) {
#pragma omp for schedule(static)
                    for (int64_t t = 0; t < tb; ++t) {
                        const int64_t src = (t0 + t) * groups + c0;
                        memcpy(&cxq[t * cg * G], xq + src * G, (size_t)(cg * G));
                        memcpy(&cdx[t * cg], dx + src, (size_t)cg * sizeof(float));
                        if (sx) memcpy(&csx[t * cg], sx + src, (size_t)cg * sizeof(float));
                        if (zx) memcpy(&czx[t * cg * h], zx + src * h, (size_t)(cg * h) * sizeof(int32_t));
                    }   // (the loop's barrier: the copy is whole before any tile reads it)
                    c = Chunk{cxq.data(), cdx.data(), sx ? csx.data() : nullptr, zx ? czx.data() : nullptr, cg};
                }
                const int64_t off = copy ? -c0 : 0;    // chunk group of the row's group g0
#pragma omp for schedule(dynamic, 1)
                for (int64_t i = 0; i < tiles; ++i) {
                    const int64_t n0 = i * NR8;
                    const int nr = (int)std::min<int64_t>(NR8, N - n0);
                    if (c0 > 0)
                        for (int64_t t = 0; t < tb; ++t)
                            memcpy(acc + t * NR8, y + (t0 + t) * N + n0, (size_t)nr * sizeof(float));
                    for (int64_t g0 = c0; g0 < c0 + cg; g0 += SG) {
                        const int64_t ng = std::min(SG, c0 + cg - g0);
                        if (g0 + SG < c0 + cg)
                            prefetch_slice(w, rb, qtype, n0, nr, g0 + SG, std::min(SG, c0 + cg - g0 - SG));
                        prepare(*tl, w, rb, qtype, n0, nr, g0, ng);
                        const int64_t mr = h == 2 ? MRH : MR8;
                        for (int64_t t = 0; t < tb; t += mr) {
                            const int m = (int)std::min<int64_t>(mr, tb - t);
                            const int64_t j = t * c.groups + g0 + off, ck = c.groups * G;
                            const int8_t* xr = c.xq + j * G;
                            float* a = acc + t * NR8;
                            if (h == 2)
                                ukernel_q8_upto<MRH, 2, true, 63>(m, ng, *tl, xr, ck, c.dx + j, nullptr,
                                                                  c.zx + 2 * j, c.groups, a, g0 > 0);
                            else if (qtype == DN_Q5_0)
                                ukernel_q8_upto<MR8, 1, true, 31>(m, ng, *tl, xr, ck, c.dx + j, nullptr, c.zx + j,
                                                                  c.groups, a, g0 > 0);
                            else if (z && pos)
                                ukernel_q8_upto<MR8, 1, true, 255, true>(m, ng, *tl, xr, ck, c.dx + j, nullptr,
                                                                         c.zx + j, c.groups, a, g0 > 0);
                            else if (z)
                                ukernel_q8_upto<MR8, 1, true, 255>(m, ng, *tl, xr, ck, c.dx + j, nullptr,
                                                                   c.zx + j, c.groups, a, g0 > 0);
                            else
                                ukernel_q8_upto<MR8, 1, false, 15>(m, ng, *tl, xr, ck, c.dx + j, c.sx + j, nullptr,
                                                                   c.groups, a, g0 > 0);
                        }
                    }
                    for (int64_t t = 0; t < tb; ++t)
                        memcpy(y + (t0 + t) * N + n0, acc + t * NR8, (size_t)nr * sizeof(float));
                }
            }
        }
    }
    return DN_OK;
}

}  // namespace dn

namespace {

template <typename X>
int qmatmul_q8(const X* x, int64_t T, int64_t K, const uint8_t* w, int qtype, int64_t N, float* y) {
    if (!dn::q8_type(qtype)) return DN_E_QTYPE;
    if (T < 0 || K <= 0 || K % dn::G || dn::row_bytes(qtype, K) < 0) return DN_E_SHAPE;
    std::vector<int8_t> xq((size_t)(T * K));
    std::vector<float> dx((size_t)(T * K / dn::G)), sx((size_t)(T * dn::q8_float_sums(qtype, K)));
    std::vector<int32_t> zx((size_t)(T * dn::q8_int_sums(qtype, K)));
    dn::quantize_rows(x, T, K, qtype, xq.data(), dx.data(), sx.data(), zx.data());
    return dn::gemm_q8(xq.data(), dx.data(), sx.data(), zx.data(), T, K, w, qtype, N, y);
}

}  // namespace

DN_API int dn_has_vnni(void) { return DN_VNNI; }

DN_API int dn_q8_simd(void) {   // 2: AVX512-VNNI, 1: AVX2 (vpmaddubsw), 0: the portable loops
#if DN_VNNI
    return 2;
#elif DN_AVX2
    return 1;
#else
    return 0;
#endif
}

DN_API int dn_q8_supports(int qtype) { return dn::q8_type(qtype) ? 1 : 0; }

DN_API int dn_qmatmul_q8(const float* x, int64_t T, int64_t K, const uint8_t* w, int qtype, int64_t N,
                         float* y) {
    return qmatmul_q8(x, T, K, w, qtype, N, y);
}

DN_API int dn_qmatmul_q8_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* w, int qtype,
                              int64_t N, float* y) {
    return qmatmul_q8(x, T, K, w, qtype, N, y);
}
