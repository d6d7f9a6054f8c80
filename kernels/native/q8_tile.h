// The weight side of the int8 kernels (q8.cpp): the quants of a tile of 16 weight rows unpacked to
// bytes and transposed into quads (four quants adjacent along K in 32 bits, one lane per row),
// with their scales and offsets per group. Included by q8.cpp only.
#pragma once

#include <stdint.h>
#include <string.h>

#include "blocks.h"
#include "gemm.h"
#include "q8.h"

namespace dn {
namespace q8 {

constexpr int G = Q8_GROUP;    // values per group (x scale, W scale/offset)
constexpr int NR8 = 16;        // weight rows per tile: one int32 lane each
constexpr int64_t SG = 8;      // groups per slice (256 values of K)
constexpr int HMAX = 2;        // weight groups per group of x, at most (Q6_K's halves of 16)

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
    dl = f16_to_f32(load_u16(b));
#if DN_VNNI
    // values 0-15 from the low nibbles, 16-31 from the high ones; bit k of qh adds 16 to value k
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const __m128i raw = _mm_loadu_si128((const __m128i*)(b + 6)), nib = _mm_set1_epi8(0x0f);
    __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), nib), _mm_and_si128(raw, nib));
    q = _mm256_mask_add_epi8(q, (__mmask32)qh, q, _mm256_set1_epi8(16));
    _mm256_storeu_si256((__m256i*)u, q);
#elif DN_AVX2
    _mm256_storeu_si256((__m256i*)u, q5_0_quants(b));
#else
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const uint8_t* qs = b + 6;
    for (int k = 0; k < 16; ++k) {
        u[k] = (uint8_t)((qs[k] & 0x0f) | (((qh >> k) & 1u) << 4));
        u[k + 16] = (uint8_t)((qs[k] >> 4) | (((qh >> (k + 16)) & 1u) << 4));
    }
#endif
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

#if DN_AVX2 && !DN_VNNI
// r[e] = dword e of the input rows r[0..7] (8 x 8 32-bit elements): unpack 32- and 64-bit halves
// per 128-bit lane, then join the lanes.
inline void transpose8(__m256i r[8]) {
    __m256i t[8];
    for (int i = 0; i < 8; i += 2) {    // per 128-bit lane: elements of rows i, i+1 interleaved
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {    // element e (lane L: 4L + e) of rows i..i+3
        r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int e = 0; e < 4; ++e) {
        t[e] = _mm256_permute2x128_si256(r[e], r[4 + e], 0x20);
        t[4 + e] = _mm256_permute2x128_si256(r[e], r[4 + e], 0x31);
    }
    for (int e = 0; e < 8; ++e) r[e] = t[e];
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
#elif DN_AVX2
    // 8 x 8 quads at a time: row i's lines c0..c0+7 (32 bytes) -> line c's rows rb..rb+7
    for (int64_t c0 = 0; c0 < lines; c0 += 8)
        for (int rb = 0; rb < NR8; rb += 8) {
            __m256i r[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256((const __m256i*)&tl.rows[rb + i][4 * c0]);
            transpose8(r);
            for (int e = 0; e < 8 && c0 + e < lines; ++e) _mm256_store_si256((__m256i*)&tl.quads[c0 + e][rb], r[e]);
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

inline void prefetch(const char* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p);
#elif defined(_MSC_VER) && defined(DN_AVX2)
    _mm_prefetch(p, _MM_HINT_T0);
#else
    (void)p;
#endif
}

// Asks for the bytes of groups [g0, g0 + ng) of rows [n0, n0 + nr) to be brought into cache, the
// tile's next slice while this one is multiplied: a slice reads 16 rows a row apart, a pattern the
// hardware prefetchers do not follow (unprefetched, the head's Q6_K slices spent ~10% of a call in
// prepare waiting for them on a Zen 3).
inline void prefetch_slice(const uint8_t* w, int64_t rb, int qtype, int64_t n0, int nr, int64_t g0, int64_t ng) {
    const int64_t off = row_bytes(qtype, g0 * G), len = row_bytes(qtype, ng * G);
    if (off < 0 || len <= 0) return;   // a slice that is not whole blocks: left to the hardware
    for (int r = 0; r < nr; ++r) {
        const char* p = (const char*)(w + (n0 + r) * rb + off);
        for (int64_t b = 0; b < len; b += 64) prefetch(p + b);
        prefetch(p + len - 1);
    }
}

#if DN_AVX2 && !DN_VNNI
// Block `blk` of 16 Q4_K rows straight into the tile, as the VNNI version does: the raw quant
// dwords transposed 8 x 8 (dword i of a row's qs holds quad i % 8 of group 2 (i / 8) in its low
// nibbles and of group 2 (i / 8) + 1 in its high ones), then split; the scales as q4_k_scales
// forms them. Half the shuffles of unpacking to bytes first, and no pass through tl.rows. Rows
// from nr on are zeros.
void prepare_q4_k(Tile& tl, const uint8_t* w, int64_t rb, int64_t n0, int nr, int64_t blk) {
    const uint8_t* base = w + n0 * rb + blk * 144;
    for (int r = 0; r < NR8; ++r) {
        float dl[8] = {}, ml[8] = {};
        if (r < nr) q4_k_scales(base + r * rb, dl, ml);
        for (int j = 0; j < 8; ++j) {
            tl.dl[j][r] = dl[j];
            tl.ml[j][r] = ml[j];
        }
    }
    const __m256i nib = _mm256_set1_epi8(0x0f);
    for (int c = 0; c < 4; ++c)          // dwords 8c..8c+7: groups 2c and 2c + 1
        for (int h = 0; h < NR8; h += 8) {
            __m256i r[8];
            for (int i = 0; i < 8; ++i)
                r[i] = h + i < nr ? _mm256_loadu_si256((const __m256i*)(base + (h + i) * rb + 16 + 32 * c))
                                  : _mm256_setzero_si256();
            transpose8(r);
            for (int e = 0; e < 8; ++e) {
                _mm256_store_si256((__m256i*)&tl.quads[16 * c + e][h], _mm256_and_si256(r[e], nib));
                _mm256_store_si256((__m256i*)&tl.quads[16 * c + 8 + e][h],
                                   _mm256_and_si256(_mm256_srli_epi16(r[e], 4), nib));
            }
        }
}
#endif

void prepare(Tile& tl, const uint8_t* w, int64_t rb, int qtype, int64_t n0, int nr, int64_t g0, int64_t ng) {
#if DN_VNNI
    if (qtype == DN_Q4_K && ng == SG && 15 * rb < ((int64_t)1 << 31))
        return prepare_q4_k(tl, w, rb, n0, nr, g0 / SG);
#elif DN_AVX2
    if (qtype == DN_Q4_K && ng == SG) return prepare_q4_k(tl, w, rb, n0, nr, g0 / SG);
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

}  // namespace q8
}  // namespace dn
