// The AVX-512 bf16 decoders declared in bf16.h.
#include "bf16.h"

#if DN_AVX512BF16
#include <string.h>

#include "blocks.h"

namespace dn {
namespace {

// --- block decoders straight to bf16 -------------------------------------------------------------
// The same fp32 values as blocks.h's dequantizers (the same products and differences, unfused),
// rounded to bf16 (nearest even) in registers: 16 lanes at a time, no fp32 round trip in memory.

// 16 signed bytes -> 16 floats.
inline __m512 i8x16(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
// 32 floats (lo: values 0-15, hi: 16-31) -> 32 bf16 at dst.
inline void put32(__m512 lo, __m512 hi, uint16_t* dst) {
    _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

inline void q8_0_bf16(const uint8_t* b, uint16_t* y) {
    const __m512 d = _mm512_set1_ps(f16_to_f32(load_u16(b)));
    const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 2));
    put32(_mm512_mul_ps(i8x16(_mm256_castsi256_si128(q)), d),
          _mm512_mul_ps(i8x16(_mm256_extracti128_si256(q, 1)), d), y);
}

// Q5_0 and Q4_K by table: a sub-block's 32 (Q5_0) or 16 (Q4_K) possible values are computed
// once, rounded to bf16, and the quants index them (vpermw): a few instructions per 32 weights
// instead of a convert-multiply-round chain per 16.

inline void q5_0_bf16(const uint8_t* b, uint16_t* y) {
    const __m512 d = _mm512_set1_ps(f16_to_f32(load_u16(b)));
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    // table[q] = d * (q - 16) for q = 0..31, as the scalar d * (float)(q - 16)
    const __m512 below = _mm512_sub_ps(iota, _mm512_set1_ps(16));          // -16..-1
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(d, iota), _mm512_mul_ps(d, below));
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const __m128i qs = _mm_loadu_si128((const __m128i*)(b + 6)), nib = _mm_set1_epi8(0x0f);
    // q: values 0-15 from the low nibbles, 16-31 from the high ones; bit j of qh adds 16 to value j
    __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), nib), _mm_and_si128(qs, nib));
    q = _mm256_mask_add_epi8(q, (__mmask32)qh, q, _mm256_set1_epi8(16));
    _mm512_storeu_si512(y, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(q), table));
}

inline void q4_k_bf16(const uint8_t* b, uint16_t* y) {
    const float d = f16_to_f32(load_u16(b)), dmin = f16_to_f32(load_u16(b + 2));
    // the eight 6-bit scales and mins as bytes (layout in blocks.h's dequant_q4_k)
    uint32_t u[3];
    memcpy(u, b + 4, 12);
    const uint32_t sc_lo = u[0] & 0x3f3f3f3fu, m_lo = u[1] & 0x3f3f3f3fu;
    const uint32_t sc_hi = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    const uint32_t m_hi = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const __m512 sm = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_set_epi32((int)m_hi, (int)m_lo, (int)sc_hi, (int)sc_lo)));
    // lanes 0-7: d * sc (the scalar dl), 8-15: dmin * m (ml)
    const __m512 scale = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(d), _mm512_set1_ps(dmin));
    const __m512 dm = _mm512_mul_ps(scale, sm);
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i nib = _mm256_set1_epi8(0x0f);
    const uint8_t* qs = b + 16;
    for (int j = 0; j < 8; ++j, y += 32) {
        const __m512 dl = _mm512_permutexvar_ps(_mm512_set1_epi32(j), dm);
        const __m512 ml = _mm512_permutexvar_ps(_mm512_set1_epi32(8 + j), dm);
        // table[q] = dl * q - ml for q = 0..15 (product and difference rounded separately)
        const __m256bh t = _mm512_cvtneps_pbh(_mm512_sub_ps(_mm512_mul_ps(dl, iota), ml));
        const __m512i table = _mm512_castsi256_si512((__m256i)t);
        const __m256i raw = _mm256_loadu_si256((const __m256i*)(qs + 32 * (j / 2)));
        const __m256i q = _mm256_and_si256((j & 1) ? _mm256_srli_epi16(raw, 4) : raw, nib);
        _mm512_storeu_si512(y, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(q), table));
    }
}

inline void q6_k_bf16(const uint8_t* b, uint16_t* y) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = (const int8_t*)(b + 192);
    const float d = f16_to_f32(load_u16(b + 208));
    float ds[16];
    for (int i = 0; i < 16; ++i) ds[i] = d * (float)sc[i];
    const __m256i nib = _mm256_set1_epi8(0x0f), top = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; ++h, ql += 64, qh += 32, y += 128) {
        const __m256i a = _mm256_loadu_si256((const __m256i*)ql);
        const __m256i c = _mm256_loadu_si256((const __m256i*)(ql + 32));
        const __m256i hb = _mm256_loadu_si256((const __m256i*)qh);
        // 6-bit quants: a nibble (low or high half of ql) | 2 bits of qh moved to bits 4-5, minus 32
        auto six = [&](__m256i nibbles, __m256i high) {
            const __m256i v = _mm256_or_si256(_mm256_and_si256(nibbles, nib), _mm256_and_si256(high, top));
            return _mm256_sub_epi8(v, off);
        };
        const __m256i q[4] = {six(a, _mm256_slli_epi16(hb, 4)), six(c, _mm256_slli_epi16(hb, 2)),
                              six(_mm256_srli_epi16(a, 4), hb),
                              six(_mm256_srli_epi16(c, 4), _mm256_srli_epi16(hb, 2))};
        const float* dh = ds + 8 * h;
        for (int g = 0; g < 4; ++g)
            put32(_mm512_mul_ps(_mm512_set1_ps(dh[2 * g]), i8x16(_mm256_castsi256_si128(q[g]))),
                  _mm512_mul_ps(_mm512_set1_ps(dh[2 * g + 1]), i8x16(_mm256_extracti128_si256(q[g], 1))),
                  y + 32 * g);
    }
}

// Values [k0, k0 + n) of one weight row as bf16 (k0, n whole blocks for block types; n a multiple
// of 16 for the float types).
void decode_bf16(int qtype, const uint8_t* row, int64_t k0, int64_t n, uint16_t* dst) {
    switch (qtype) {
        case DN_Q8_0:
            for (int64_t j = 0; j < n; j += 32) q8_0_bf16(row + (k0 + j) / 32 * 34, dst + j);
            return;
        case DN_Q5_0:
            for (int64_t j = 0; j < n; j += 32) q5_0_bf16(row + (k0 + j) / 32 * 22, dst + j);
            return;
        case DN_Q4_K:
            for (int64_t j = 0; j < n; j += QK_K) q4_k_bf16(row + (k0 + j) / QK_K * 144, dst + j);
            return;
        case DN_Q6_K:
            for (int64_t j = 0; j < n; j += QK_K) q6_k_bf16(row + (k0 + j) / QK_K * 210, dst + j);
            return;
        case DN_BF16:
            memcpy(dst, row + 2 * k0, (size_t)n * 2);
            return;
        case DN_F16:
            for (int64_t j = 0; j < n; j += 16) {
                const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(row + 2 * (k0 + j))));
                _mm256_storeu_si256((__m256i*)(dst + j), (__m256i)_mm512_cvtneps_pbh(v));
            }
            return;
        case DN_F32:
            to_bf16((const float*)(row + 4 * k0), n, dst);
            return;
    }
}

}  // namespace

void to_bf16(const float* src, int64_t n, uint16_t* dst) {
    for (int64_t k = 0; k < n; k += 16)
        _mm256_storeu_si256((__m256i*)(dst + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
}

void decode_span(int qtype, const uint8_t* row, int64_t k0, int64_t n, int64_t width, uint16_t* dst) {
    const int64_t n16 = n / 16 * 16;                  // block types: n itself (blocks are 32 or 256)
    const unsigned rem = (unsigned)(n % 16);
    decode_bf16(qtype, row, k0, n16, dst);
    if (rem) {                                        // a float row's last n % 16 values
        alignas(64) float tmp[16] = {};
        dequant_range(qtype, row, k0 + n16, rem, tmp);
        to_bf16(tmp, 16, dst + n16);
    }
    for (int64_t k = (n + 15) / 16 * 16; k < width; ++k) dst[k] = 0;
}

void decode_pairs(int qtype, const uint8_t* w, int64_t rb, int64_t n0, int64_t n_hi, int64_t rows,
                  int64_t k0, int64_t ks, int64_t width, uint32_t* wv) {
    // lane 2j of a line from row 2i's value j, lane 2j + 1 from row 2i + 1's (the second source
    // of vpermt2w is indexed from 32)
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
    alignas(64) uint16_t half[2][256];
    for (int64_t i = 0; i < rows / 2; ++i) {
        for (int h = 0; h < 2; ++h) {
            const int64_t n = n0 + 2 * i + h;
            if (n < n_hi) {
                decode_span(qtype, w + n * rb, k0, ks, width, half[h]);
            } else {
                memset(half[h], 0, (size_t)width * 2);
            }
        }
        uint32_t* out = wv + i * width;
        for (int64_t j = 0; j < width; j += 32) {
            const __m512i a = _mm512_load_si512(half[0] + j), b = _mm512_load_si512(half[1] + j);
            _mm512_storeu_si512(out + j, _mm512_permutex2var_epi16(a, lo_idx, b));
            _mm512_storeu_si512(out + j + 16, _mm512_permutex2var_epi16(a, hi_idx, b));
        }
    }
}

}  // namespace dn
#endif  // DN_AVX512BF16
