// Int8 products on the quantized blocks: dn_qmatmul_q8 and dn_moe_q8 (and their bf16-x twins).
//
// Legend: T activation rows, K in-features, N weight rows, G = 32 values per group; a "quad" is
// four int8/uint8 values adjacent along K packed in 32 bits, the operand of vpdpbusd.
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
// are unpacked to bytes, transposed so one zmm holds a quad of each of the 16 rows (Q4_K: straight
// from the raw bytes, prepare_q4_k), and reused by every activation row (broadcast quads of x).
// The rounding of x to int8 is the price: a coarser product than bf16's (relative error up to
// 1/254 of a group's largest value per element).
#include <math.h>
#include <string.h>

#include <cmath>
#include <limits>

#include <algorithm>
#include <memory>
#include <vector>

#include "q8.h"

#include "blocks.h"
#include "gemm.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define DN_VNNI 1
#else
#define DN_VNNI 0
#endif

namespace dn {
namespace {

constexpr int G = Q8_GROUP;    // values per group (x scale, W scale/offset)
constexpr int NR8 = 16;        // weight rows per tile: one int32 lane each
constexpr int MR8 = 8;         // activation rows per register block
// The same for Q6_K, whose two halves per group keep three accumulators per row: on a Zen 4 its
// head-shaped product (256 x 2816 x 32768) ran 6-8% faster with 4 rows than with 8 (5 and 6 in
// between, 3 and 7 slower); for the one-scale types 4 or 6 rows were no faster than 8
constexpr int MRH = 4;
constexpr int64_t SG = 8;      // groups per slice (256 values of K)
constexpr int64_t TB8 = 512;   // activation rows per pass
constexpr int64_t KC = 64;     // groups per chunk of a long K (2,048 values: 512 KB of 256 rows)
constexpr int HMAX = 2;        // weight groups per group of x, at most (Q6_K's halves of 16)

// --- activations ---------------------------------------------------------------------------------

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

// A group whose largest |x| is below this (3.7e-37) is stored as zeros: 127 / max|x| would
// overflow to inf. A group holding a NaN or an inf gets dx = sx = NaN (and xq = zx = 0), so the
// products it meets are NaN, as the bf16 and fp32 kernels' would be.
constexpr float Q8_TINY = 127.0f / 3.40282347e38f;

// Where one group's sums go: Q4_K's float sx = dx * sum (one per group), or the int32
// zx = -off * sum per `sub` values (16 or 32) for the types whose offset is `off` scales.
struct GroupSums {
    float* sx;
    int32_t* zx;
    int off, sub;

    void store(float d, int32_t lo, int32_t hi) const {
        if (!zx) {
            sx[0] = d * (float)(lo + hi);
        } else if (sub == G) {
            zx[0] = -off * (lo + hi);
        } else {
            zx[0] = -off * lo;
            zx[1] = -off * hi;
        }
    }
    void special(float d) const {
        if (!zx) sx[0] = d;
        else zx[0] = zx[sub == G ? 0 : 1] = 0;
    }
};

inline void special_group(int8_t* q, float& d, const GroupSums& s, bool finite) {
    memset(q, 0, G);
    d = finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
    s.special(d);
}

#if DN_VNNI
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {   // bf16 bits -> fp32, exactly
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// One group of 32 values, the scalar loop's operations in 16 lanes (the same roundings: 127 / amax
// and x * that in fp32, then round half to even as nearbyintf in the default rounding mode).
template <typename X>
inline void quantize_group(const X* src, int8_t* q, float& d, const GroupSums& s) {
    const __m512 v0 = load16(src), v1 = load16(src + 16);
    const __m512i exp = _mm512_set1_epi32(0x7f800000);    // all exponent bits set: inf or NaN
    const __mmask16 bad = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v0), exp), exp) |
                          _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v1), exp), exp);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    if (bad || !(amax >= Q8_TINY)) return special_group(q, d, s, !bad);
    const __m512 id = _mm512_set1_ps(127.0f / amax);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    _mm_storeu_si128((__m128i*)q, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtepi32_epi8(q1));
    d = amax / 127.0f;
    s.store(d, _mm512_reduce_add_epi32(q0), _mm512_reduce_add_epi32(q1));
}
#else
template <typename X>
inline void quantize_group(const X* src, int8_t* q, float& d, const GroupSums& s) {
    float v[G], amax = 0.0f;
    bool finite = true;
    for (int k = 0; k < G; ++k) {
        v[k] = to_f32(src[k]);
        finite = finite && std::isfinite(v[k]);
        amax = std::max(amax, fabsf(v[k]));
    }
    if (!finite || !(amax >= Q8_TINY)) return special_group(q, d, s, finite);
    const float id = 127.0f / amax;
    int sum[2] = {0, 0};
    for (int k = 0; k < G; ++k) {
        q[k] = (int8_t)(int)nearbyintf(v[k] * id);   // |v * id| <= 127 (rounded)
        sum[k / 16] += q[k];
    }
    d = amax / 127.0f;
    s.store(d, sum[0], sum[1]);
}
#endif

// Rows of x [T, K] (K a multiple of G) -> xq [T, K], dx [T, K / G] and the sums qtype's kernel
// needs (see q8.h's quantize_rows).
template <typename X>
void quantize_any(const X* x, int64_t T, int64_t K, int qtype, int8_t* xq, float* dx, float* sx, int32_t* zx) {
    const int64_t groups = K / G;
    const int off = q8_offset(qtype), sub = q8_sub(qtype), h = G / sub;
#pragma omp parallel for schedule(static) if (T * K > 65536)
    for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t i = t * groups + g;
            const GroupSums gs{off ? nullptr : sx + i, off ? zx + i * h : nullptr, off, sub};
            quantize_group(x + t * K + g * G, xq + t * K + g * G, dx[i], gs);
        }
}

// --- weights: one group of one row -> 32 unsigned bytes u, with w = dl * u - ml -----------------
// (ml = q8_offset(qtype) * dl for all but Q4_K, so only Q4_K's unpacking returns it)

inline void unpack_q8_0(const uint8_t* b, uint8_t* u, float& dl) {
    const float d = f16_to_f32(load_u16(b));
#if DN_AVX2
    const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 2));
    _mm256_storeu_si256((__m256i*)u, _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)));   // q + 128
#else
    for (int k = 0; k < 32; ++k) u[k] = (uint8_t)(b[2 + k] ^ 0x80);   // q + 128
#endif
    dl = d;
}

inline void unpack_q5_0(const uint8_t* b, uint8_t* u, float& dl) {
    const float d = f16_to_f32(load_u16(b));
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const uint8_t* qs = b + 6;
#if DN_VNNI
    // values 0-15 from the low nibbles, 16-31 from the high ones; bit k of qh adds 16 to value k
    const __m128i raw = _mm_loadu_si128((const __m128i*)qs), nib = _mm_set1_epi8(0x0f);
    __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), nib), _mm_and_si128(raw, nib));
    q = _mm256_mask_add_epi8(q, (__mmask32)qh, q, _mm256_set1_epi8(16));
    _mm256_storeu_si256((__m256i*)u, q);
#else
    for (int k = 0; k < 16; ++k) {
        u[k] = (uint8_t)((qs[k] & 0x0f) | (((qh >> k) & 1u) << 4));
        u[k + 16] = (uint8_t)((qs[k] >> 4) | (((qh >> (k + 16)) & 1u) << 4));
    }
#endif
    dl = d;
}

// All eight groups of a Q4_K block: u[256], dl[8], ml[8] (the products as dequant_q4_k forms them).
inline void unpack_q4_k(const uint8_t* b, uint8_t* u, float* dl, float* ml) {
    const uint8_t* qs = b + 16;
    q4_k_scales(b, dl, ml);
    for (int c = 0; c < 4; ++c, qs += 32, u += 64) {
#if DN_AVX2
        const __m256i raw = _mm256_loadu_si256((const __m256i*)qs), nib = _mm256_set1_epi8(0x0f);
        _mm256_storeu_si256((__m256i*)u, _mm256_and_si256(raw, nib));
        _mm256_storeu_si256((__m256i*)(u + 32), _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib));
#else
        for (int l = 0; l < 32; ++l) {
            u[l] = qs[l] & 15;
            u[l + 32] = qs[l] >> 4;
        }
#endif
    }
}

// All sixteen halves of a Q6_K block: u[256] (the 6-bit quants, 0..63) and dl[16]; the bit
// layout is dequant_q6_k's (blocks.h), without its - 32 (the offset, q8_offset).
inline void unpack_q6_k(const uint8_t* b, uint8_t* u, float* dl) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = (const int8_t*)(b + 192);
    const float d = f16_to_f32(load_u16(b + 208));
    for (int i = 0; i < 16; ++i) dl[i] = d * (float)sc[i];
    for (int h = 0; h < 2; ++h, ql += 64, qh += 32, u += 128) {
#if DN_AVX2
        const __m256i a = _mm256_loadu_si256((const __m256i*)ql);
        const __m256i c = _mm256_loadu_si256((const __m256i*)(ql + 32));
        const __m256i hb = _mm256_loadu_si256((const __m256i*)qh);
        const __m256i nib = _mm256_set1_epi8(0x0f), top = _mm256_set1_epi8(0x30);
        _mm256_storeu_si256((__m256i*)u, _mm256_or_si256(_mm256_and_si256(a, nib),
                            _mm256_and_si256(_mm256_slli_epi16(hb, 4), top)));
        _mm256_storeu_si256((__m256i*)(u + 32), _mm256_or_si256(_mm256_and_si256(c, nib),
                            _mm256_and_si256(_mm256_slli_epi16(hb, 2), top)));
        _mm256_storeu_si256((__m256i*)(u + 64), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), nib),
                            _mm256_and_si256(hb, top)));
        _mm256_storeu_si256((__m256i*)(u + 96), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), nib),
                            _mm256_and_si256(_mm256_srli_epi16(hb, 2), top)));
#else
        for (int l = 0; l < 32; ++l) {
            u[l] = (uint8_t)((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4));
            u[l + 32] = (uint8_t)((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4));
            u[l + 64] = (uint8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
            u[l + 96] = (uint8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
        }
#endif
    }
}

// Weight groups per group of x: 2 for Q6_K (a scale per 16 values), 1 for the others.
inline int halves(int qtype) { return qtype == DN_Q6_K ? 2 : 1; }

// --- one tile: rows [n0, n0 + nr) of W, groups [g0, g0 + ng) ------------------------------------

struct alignas(64) Sums {
    float v[NR8];
};

struct Tile {
    alignas(64) uint8_t rows[NR8][SG * G];   // unpacked quants, row-major
    alignas(64) uint32_t quads[SG * 8][NR8]; // the same transposed: line = quad index, lane = row
    alignas(64) float dl[SG * HMAX][NR8];   // [weight group][row]: group g half h at g * H + h
    alignas(64) float ml[SG][NR8];          // Q4_K only
};

#if DN_VNNI
// out[c] lane r = in[r] lane c, for 16 x 16 32-bit elements: unpack 32- and 64-bit halves, then
// move 128-bit lanes.
inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    // r[4R + m]: 128-bit lane L holds element 4L + m of rows 4R..4R+3
    for (int R = 0; R < 4; ++R) {
        const __m512i a = t[4 * R], b = t[4 * R + 1], c = t[4 * R + 2], d = t[4 * R + 3];
        r[4 * R + 0] = _mm512_unpacklo_epi64(a, c);
        r[4 * R + 1] = _mm512_unpackhi_epi64(a, c);
        r[4 * R + 2] = _mm512_unpacklo_epi64(b, d);
        r[4 * R + 3] = _mm512_unpackhi_epi64(b, d);
    }
    for (int m = 0; m < 4; ++m) {
        const __m512i v0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44);
        const __m512i v1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xee);
        const __m512i v2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
        const __m512i v3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xee);
        t[m] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        t[4 + m] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
        t[8 + m] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        t[12 + m] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
    for (int c = 0; c < 16; ++c) r[c] = t[c];
}
#endif

void transpose_quads(Tile& tl, int64_t lines) {
#if DN_VNNI
    for (int64_t c0 = 0; c0 < lines; c0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(&tl.rows[i][4 * c0]);
        transpose16(r);
        for (int c = 0; c < 16 && c0 + c < lines; ++c) _mm512_store_si512(tl.quads[c0 + c], r[c]);
    }
#else
    for (int64_t c = 0; c < lines; ++c)
        for (int r = 0; r < NR8; ++r) memcpy(&tl.quads[c][r], &tl.rows[r][4 * c], 4);
#endif
}

#if DN_VNNI
// Block `blk` of 16 Q4_K rows (the slice's 8 groups) straight into the tile, lane r = row r: the
// rows' headers gathered, their 6-bit scales and mins unpacked in lanes (the products of
// dequant_q4_k), and the quants transposed from the raw bytes, where dword i of a row's qs holds
// quad i % 8 of group 2 (i / 8) in its low nibbles and of group 2 (i / 8) + 1 in its high ones.
// Rows from nr on are zeros. Needs 15 rb < 2^31 (the gather's offsets).
void prepare_q4_k(Tile& tl, const uint8_t* w, int64_t rb, int64_t n0, int nr, int64_t blk) {
    const __mmask16 live = (__mmask16)((1u << nr) - 1u);
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)rb));
    const uint8_t* base = w + n0 * rb + blk * 144;
    const __m512i zero = _mm512_setzero_si512();
    const __m512i D = _mm512_mask_i32gather_epi32(zero, live, rows, base, 1);
    const __m512i U0 = _mm512_mask_i32gather_epi32(zero, live, rows, base + 4, 1);
    const __m512i U1 = _mm512_mask_i32gather_epi32(zero, live, rows, base + 8, 1);
    const __m512i U2 = _mm512_mask_i32gather_epi32(zero, live, rows, base + 12, 1);
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(D));
    const __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(D, 16)));
    const __m512i six = _mm512_set1_epi32(63), four = _mm512_set1_epi32(15), two = _mm512_set1_epi32(3);
    for (int j = 0; j < 4; ++j) {
        const __m512i s0 = _mm512_srli_epi32(U0, 8 * j), s1 = _mm512_srli_epi32(U1, 8 * j);
        const __m512i s2 = _mm512_srli_epi32(U2, 8 * j);
        const __m512i sc = _mm512_and_si512(s0, six), m = _mm512_and_si512(s1, six);
        const __m512i sc_hi = _mm512_or_si512(_mm512_and_si512(s2, four),
                                              _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(s0, 6), two), 4));
        const __m512i m_hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(s2, 4), four),
                                             _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(s1, 6), two), 4));
        _mm512_store_ps(tl.dl[j], _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc)));
        _mm512_store_ps(tl.ml[j], _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m)));
        _mm512_store_ps(tl.dl[j + 4], _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc_hi)));
        _mm512_store_ps(tl.ml[j + 4], _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m_hi)));
    }
    const __m512i nib = _mm512_set1_epi8(0x0f);
    for (int h = 0; h < 2; ++h) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
            r[i] = i < nr ? _mm512_loadu_si512(base + i * rb + 16 + 64 * h) : zero;
        transpose16(r);
        for (int c = 0; c < 16; ++c) {
            const int chunk = 2 * h + c / 8, j = c % 8;
            _mm512_store_si512(tl.quads[16 * chunk + j], _mm512_and_si512(r[c], nib));
            _mm512_store_si512(tl.quads[16 * chunk + 8 + j], _mm512_and_si512(_mm512_srli_epi32(r[c], 4), nib));
        }
    }
}
#endif

void prepare(Tile& tl, const uint8_t* w, int64_t rb, int qtype, int64_t n0, int nr, int64_t g0, int64_t ng) {
#if DN_VNNI
    if (qtype == DN_Q4_K && ng == SG && 15 * rb < ((int64_t)1 << 31))
        return prepare_q4_k(tl, w, rb, n0, nr, g0 / SG);
#endif
    for (int r = 0; r < NR8; ++r) {
        if (r >= nr) {
            memset(tl.rows[r], 0, (size_t)(ng * G));
            for (int64_t g = 0; g < ng * halves(qtype); ++g) tl.dl[g][r] = 0.0f;
            for (int64_t g = 0; g < ng; ++g) tl.ml[g][r] = 0.0f;
            continue;
        }
        const uint8_t* row = w + (n0 + r) * rb;
        if (qtype == DN_Q6_K) {           // K is whole blocks: ng = 8, one block
            float dl[16];
            unpack_q6_k(row + g0 / 8 * 210, tl.rows[r], dl);
            for (int j = 0; j < 16; ++j) tl.dl[j][r] = dl[j];
        } else if (qtype == DN_Q4_K) {           // g0 and ng are whole blocks of 8 groups except at K's end
            for (int64_t g = 0; g < ng; g += 8) {
                float dl[8], ml[8];
                unpack_q4_k(row + (g0 + g) / 8 * 144, tl.rows[r] + g * G, dl, ml);
                for (int j = 0; j < 8; ++j) {
                    tl.dl[g + j][r] = dl[j];
                    tl.ml[g + j][r] = ml[j];
                }
            }
        } else {
            for (int64_t g = 0; g < ng; ++g) {
                float dl;
                if (qtype == DN_Q5_0) unpack_q5_0(row + (g0 + g) * 22, tl.rows[r] + g * G, dl);
                else unpack_q8_0(row + (g0 + g) * 34, tl.rows[r] + g * G, dl);
                tl.dl[g][r] = dl;
            }
        }
    }
    transpose_quads(tl, ng * 8);
}

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
template <int M, int H, bool Z>
void ukernel_q8(int64_t ng, const Tile& tl, const int8_t* xq, int64_t K, const float* dx, const float* sx,
                const int32_t* zx, int64_t gs, float* acc, bool add) {
    static_assert(Z || H == 1, "halves come with an integer offset (Q6_K)");
    constexpr int QH = 8 / H;   // quads per weight group
#if DN_VNNI
    __m512 c[M];
    for (int t = 0; t < M; ++t) c[t] = add ? _mm512_load_ps(acc + t * NR8) : _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        __m512 f[M];      // Z: sum over halves of dl * (signed dot product), before dx
        for (int h = 0; h < H; ++h) {
            __m512i s[M];
            for (int t = 0; t < M; ++t)
                s[t] = Z ? _mm512_set1_epi32(zx[(t * gs + g) * H + h]) : _mm512_setzero_si512();
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

template <int M, int H, bool Z>
void ukernel_q8_upto(int m, int64_t ng, const Tile& tl, const int8_t* xq, int64_t K, const float* dx,
                     const float* sx, const int32_t* zx, int64_t gs, float* acc, bool add) {
    if constexpr (M > 1) {
        if (m < M) return ukernel_q8_upto<M - 1, H, Z>(m, ng, tl, xq, K, dx, sx, zx, gs, acc, add);
    }
    ukernel_q8<M, H, Z>(ng, tl, xq, K, dx, sx, zx, gs, acc, add);
}

}  // namespace

bool q8_type(int qtype) {
    return qtype == DN_Q4_K || qtype == DN_Q5_0 || qtype == DN_Q8_0 || qtype == DN_Q6_K;
}

int q8_sub(int qtype) { return G / halves(qtype); }

int64_t q8_float_sums(int qtype, int64_t K) { return q8_offset(qtype) ? 0 : K / G; }
int64_t q8_int_sums(int qtype, int64_t K) { return q8_offset(qtype) ? K / q8_sub(qtype) : 0; }

int q8_offset(int qtype) {
    switch (qtype) {
        case DN_Q5_0: return 16;
        case DN_Q8_0: return 128;
        case DN_Q6_K: return 32;
        default: return 0;
    }
}

void quantize_rows(const float* x, int64_t T, int64_t K, int qtype, int8_t* xq, float* dx, float* sx,
                   int32_t* zx) {
    quantize_any(x, T, K, qtype, xq, dx, sx, zx);
}
void quantize_rows(const uint16_t* x, int64_t T, int64_t K, int qtype, int8_t* xq, float* dx, float* sx,
                   int32_t* zx) {
    quantize_any(x, T, K, qtype, xq, dx, sx, zx);
}

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
                        prepare(*tl, w, rb, qtype, n0, nr, g0, ng);
                        const int64_t mr = h == 2 ? MRH : MR8;
                        for (int64_t t = 0; t < tb; t += mr) {
                            const int m = (int)std::min<int64_t>(mr, tb - t);
                            const int64_t j = t * c.groups + g0 + off, ck = c.groups * G;
                            const int8_t* xr = c.xq + j * G;
                            float* a = acc + t * NR8;
                            if (h == 2)
                                ukernel_q8_upto<MRH, 2, true>(m, ng, *tl, xr, ck, c.dx + j, nullptr, c.zx + 2 * j,
                                                              c.groups, a, g0 > 0);
                            else if (z)
                                ukernel_q8_upto<MR8, 1, true>(m, ng, *tl, xr, ck, c.dx + j, nullptr, c.zx + j,
                                                              c.groups, a, g0 > 0);
                            else
                                ukernel_q8_upto<MR8, 1, false>(m, ng, *tl, xr, ck, c.dx + j, c.sx + j, nullptr,
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

DN_API int dn_q8_supports(int qtype) { return dn::q8_type(qtype) ? 1 : 0; }

DN_API int dn_qmatmul_q8(const float* x, int64_t T, int64_t K, const uint8_t* w, int qtype, int64_t N,
                         float* y) {
    return qmatmul_q8(x, T, K, w, qtype, N, y);
}

DN_API int dn_qmatmul_q8_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* w, int qtype,
                              int64_t N, float* y) {
    return qmatmul_q8(x, T, K, w, qtype, N, y);
}

DN_API int dn_quantize_q8(const float* x, int64_t T, int64_t K, int qtype, int8_t* xq, float* dx, float* sx,
                          int32_t* zx) {
    if (!dn::q8_type(qtype)) return DN_E_QTYPE;
    if (T < 0 || K <= 0 || K % dn::G) return DN_E_SHAPE;
    dn::quantize_rows(x, T, K, qtype, xq, dx, sx, zx);
    return DN_OK;
}
