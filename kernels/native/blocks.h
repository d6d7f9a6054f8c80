// ggml block formats -> fp32, one block at a time.
//
// Each dequantizer performs the same float operations in the same order as gguf.quants (the
// test oracle), so the results are bit-identical: products are formed in fp32 exactly as numpy
// does, and the build uses -ffp-contract=off so the compiler never fuses `a*b - c` into an FMA
// (which would round once instead of twice). Layouts are drawn per format below.
#pragma once

#include <stdint.h>
#include <string.h>

#include "diffcli_native.h"

#if defined(__AVX2__)
#include <immintrin.h>
#define DN_AVX2 1
#endif

namespace dn {

constexpr int QK_K = 256;

struct BlockInfo {
    int64_t elems;   // values per block
    int64_t bytes;   // bytes per block
};

inline BlockInfo block_info(int qtype) {
    switch (qtype) {
        case DN_F32: return {1, 4};
        case DN_F16: return {1, 2};
        case DN_BF16: return {1, 2};
        case DN_Q8_0: return {32, 34};
        case DN_Q5_0: return {32, 22};
        case DN_Q4_K: return {QK_K, 144};
        case DN_Q6_K: return {QK_K, 210};
        default: return {0, 0};
    }
}

inline uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

// IEEE half -> float, exact for every input (subnormals normalised, inf/nan kept).
inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {
            int shifts = 0;
            while (!(man & 0x400u)) { man <<= 1; ++shifts; }
            bits = sign | ((uint32_t)(113 - shifts) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if DN_AVX2
// 8 signed bytes at p -> 8 floats.
inline __m256 i8x8_ps(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
// The 8 signed bytes at position 8 * j (j = 0..3) of v -> 8 floats, in registers. (Storing v and
// reloading its quarters, as the first AVX2 dequantizers did, stalls: a 32-byte store does not
// forward to an 8-byte load at an offset, and the loads wait for the store to retire.)
template <int J>
inline __m256 i8_quarter_ps(__m256i v) {
    const __m128i h = J < 2 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(J % 2 ? _mm_unpackhi_epi64(h, h) : h));
}
// y[0..32) = v's 32 signed bytes scaled, each product rounded as the scalar loops round it:
// scale32 by d0 (values 0-15) and d1 (16-31), scale_sub32 by d then minus m.
inline void scale32(__m256i v, __m256 d0, __m256 d1, float* y) {
    _mm256_storeu_ps(y, _mm256_mul_ps(d0, i8_quarter_ps<0>(v)));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(d0, i8_quarter_ps<1>(v)));
    _mm256_storeu_ps(y + 16, _mm256_mul_ps(d1, i8_quarter_ps<2>(v)));
    _mm256_storeu_ps(y + 24, _mm256_mul_ps(d1, i8_quarter_ps<3>(v)));
}
inline void scale_sub32(__m256i v, __m256 d, __m256 m, float* y) {
    _mm256_storeu_ps(y, _mm256_sub_ps(_mm256_mul_ps(d, i8_quarter_ps<0>(v)), m));
    _mm256_storeu_ps(y + 8, _mm256_sub_ps(_mm256_mul_ps(d, i8_quarter_ps<1>(v)), m));
    _mm256_storeu_ps(y + 16, _mm256_sub_ps(_mm256_mul_ps(d, i8_quarter_ps<2>(v)), m));
    _mm256_storeu_ps(y + 24, _mm256_sub_ps(_mm256_mul_ps(d, i8_quarter_ps<3>(v)), m));
}
#endif

// Q8_0, 32 values in 34 bytes:  | f16 d | int8 q[32] |   value = q * d
inline void dequant_q8_0(const uint8_t* b, float* y) {
    const float d = f16_to_f32(load_u16(b));
    const int8_t* q = (const int8_t*)(b + 2);
#if DN_AVX2
    const __m256 vd = _mm256_set1_ps(d);
    for (int j = 0; j < 32; j += 8)
        _mm256_storeu_ps(y + j, _mm256_mul_ps(i8x8_ps((const uint8_t*)q + j), vd));
#else
    for (int j = 0; j < 32; ++j) y[j] = (float)q[j] * d;
#endif
}

// Q5_0, 32 values in 22 bytes:  | f16 d | u32 qh | qs[16] |
// qs[k] low nibble = value k, high nibble = value k+16; bit j of qh = 5th bit of value j.
// value = d * ((nibble | bit << 4) - 16)
#if DN_AVX2
// The 32 unsigned 5-bit quants of the Q5_0 block at b, byte k = quant k (0..31).
inline __m256i q5_0_quants(const uint8_t* b) {
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const __m128i raw = _mm_loadu_si128((const __m128i*)(b + 6)), nib = _mm_set1_epi8(0x0f);
    const __m256i q4 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), nib), _mm_and_si128(raw, nib));
    // qh spread over the bytes: byte k gets byte k / 8 of qh (in each 128-bit lane; lane 1 reads
    // bytes 2 and 3 of its own copy) and keeps bit k % 8, as 0x10 or 0
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
                                          _mm256_set1_epi8(0x10));
    return _mm256_or_si256(q4, high);
}
#endif

inline void dequant_q5_0(const uint8_t* b, float* y) {
    const float d = f16_to_f32(load_u16(b));
#if DN_AVX2
    const __m256 vd = _mm256_set1_ps(d);
    scale32(_mm256_sub_epi8(q5_0_quants(b), _mm256_set1_epi8(16)), vd, vd, y);   // quants - 16: [-16, 15]
#else
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const uint8_t* qs = b + 6;
    for (int k = 0; k < 16; ++k) {
        const int lo = (qs[k] & 0x0f) | (int)(((qh >> k) & 1u) << 4);
        const int hi = (qs[k] >> 4) | (int)(((qh >> (k + 16)) & 1u) << 4);
        y[k] = d * (float)(lo - 16);
        y[k + 16] = d * (float)(hi - 16);
    }
#endif
}

// Q4_K, 256 values in 144 bytes:  | f16 d | f16 dmin | scales[12] | qs[128] |
// Eight sub-blocks of 32 with 6-bit scale sc and min m packed in `scales`:
//   byte 0..3  : mmSSSSSS  (S = sc of sub-block 0..3, m = top 2 bits of sc of 4..7)
//   byte 4..7  : mmMMMMMM  (M = m of sub-block 0..3, m = top 2 bits of m of 4..7)
//   byte 8..11 : MMMMSSSS  (low 4 bits of m and sc of sub-block 4..7)
// qs is four 32-byte chunks; chunk c: low nibbles = sub-block 2c, high nibbles = sub-block 2c+1.
// value = (d*sc) * q - (dmin*m)
// The eight sub-blocks' scales dl = d*sc and mins ml = dmin*m of the Q4_K block at b.
inline void q4_k_scales(const uint8_t* b, float* dl, float* ml) {
    const float d = f16_to_f32(load_u16(b));
    const float dmin = f16_to_f32(load_u16(b + 2));
    const uint8_t* s = b + 4;
    for (int i = 0; i < 4; ++i) {
        dl[i] = d * (float)(s[i] & 63);
        ml[i] = dmin * (float)(s[i + 4] & 63);
        dl[i + 4] = d * (float)((s[i + 8] & 15) | ((s[i] >> 6) << 4));
        ml[i + 4] = dmin * (float)((s[i + 8] >> 4) | ((s[i + 4] >> 6) << 4));
    }
}

inline void dequant_q4_k(const uint8_t* b, float* y) {
    const uint8_t* qs = b + 16;
    float dl[8], ml[8];
    q4_k_scales(b, dl, ml);
    for (int c = 0; c < 4; ++c, qs += 32, y += 64) {
#if DN_AVX2
        const __m256 d0 = _mm256_set1_ps(dl[2 * c]), m0 = _mm256_set1_ps(ml[2 * c]);
        const __m256 d1 = _mm256_set1_ps(dl[2 * c + 1]), m1 = _mm256_set1_ps(ml[2 * c + 1]);
        const __m256i raw = _mm256_loadu_si256((const __m256i*)qs);
        const __m256i nib = _mm256_set1_epi8(0x0f);   // nibbles 0-15: as signed bytes too
        scale_sub32(_mm256_and_si256(raw, nib), d0, m0, y);
        scale_sub32(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib), d1, m1, y + 32);
#else
        for (int l = 0; l < 32; ++l) {
            y[l] = dl[2 * c] * (float)(qs[l] & 15) - ml[2 * c];
            y[l + 32] = dl[2 * c + 1] * (float)(qs[l] >> 4) - ml[2 * c + 1];
        }
#endif
    }
}

// Q6_K, 256 values in 210 bytes:  | ql[128] | qh[64] | int8 scales[16] | f16 d |
// Two halves of 128 values; half h reads ql[64h..], qh[32h..]. For l in 0..31:
//   value l    = ql[l]    & 15 | (qh[l] >> 0 & 3) << 4
//   value l+32 = ql[l+32] & 15 | (qh[l] >> 2 & 3) << 4
//   value l+64 = ql[l]    >> 4 | (qh[l] >> 4 & 3) << 4
//   value l+96 = ql[l+32] >> 4 | (qh[l] >> 6 & 3) << 4
// Each run of 16 values has its own scale. value = (d*scale) * (q - 32)
inline void dequant_q6_k(const uint8_t* b, float* y) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = (const int8_t*)(b + 192);
    const float d = f16_to_f32(load_u16(b + 208));
    float ds[16];
    for (int i = 0; i < 16; ++i) ds[i] = d * (float)sc[i];
    for (int h = 0; h < 2; ++h, ql += 64, qh += 32, y += 128) {
        const float* dh = ds + 8 * h;
#if DN_AVX2
        const __m256i a = _mm256_loadu_si256((const __m256i*)ql);
        const __m256i c = _mm256_loadu_si256((const __m256i*)(ql + 32));
        const __m256i hb = _mm256_loadu_si256((const __m256i*)qh);
        const __m256i nib = _mm256_set1_epi8(0x0f), top = _mm256_set1_epi8(0x30);
        const __m256i off = _mm256_set1_epi8(32);
        const __m256i q[4] = {
            _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(a, nib),
                                            _mm256_and_si256(_mm256_slli_epi16(hb, 4), top)), off),
            _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(c, nib),
                                            _mm256_and_si256(_mm256_slli_epi16(hb, 2), top)), off),
            _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), nib),
                                            _mm256_and_si256(hb, top)), off),
            _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), nib),
                                            _mm256_and_si256(_mm256_srli_epi16(hb, 2), top)), off)};
        for (int g = 0; g < 4; ++g)     // 32 values, two runs of 16 with their own scales
            scale32(q[g], _mm256_set1_ps(dh[2 * g]), _mm256_set1_ps(dh[2 * g + 1]), y + 32 * g);
#else
        for (int l = 0; l < 32; ++l) {
            const int q0 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q1 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = dh[l / 16] * (float)q0;
            y[l + 32] = dh[(l + 32) / 16] * (float)q1;
            y[l + 64] = dh[(l + 64) / 16] * (float)q2;
            y[l + 96] = dh[(l + 96) / 16] * (float)q3;
        }
#endif
    }
}

// float -> bf16 bits, rounded to nearest even as torch's .to(torch.bfloat16) (NaN stays NaN).
inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// Values [k0, k0+n) of one weight row starting at `row`. For block types k0 is a multiple of
// the block size and so is n (rows are whole blocks); float types take any range.
inline void dequant_range(int qtype, const uint8_t* row, int64_t k0, int64_t n, float* y) {
    switch (qtype) {
        case DN_F32:
            memcpy(y, row + 4 * k0, (size_t)n * 4);
            return;
        case DN_F16: {
            const uint8_t* p = row + 2 * k0;
            int64_t j = 0;
#if defined(__F16C__)
            for (; j + 8 <= n; j += 8)
                _mm256_storeu_ps(y + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 2 * j))));
#endif
            for (; j < n; ++j) y[j] = f16_to_f32(load_u16(p + 2 * j));
            return;
        }
        case DN_BF16: {
            const uint8_t* p = row + 2 * k0;
            for (int64_t j = 0; j < n; ++j) y[j] = bf16_to_f32(load_u16(p + 2 * j));
            return;
        }
        case DN_Q8_0:
            for (int64_t j = 0; j < n; j += 32) dequant_q8_0(row + (k0 + j) / 32 * 34, y + j);
            return;
        case DN_Q5_0:
            for (int64_t j = 0; j < n; j += 32) dequant_q5_0(row + (k0 + j) / 32 * 22, y + j);
            return;
        case DN_Q4_K:
            for (int64_t j = 0; j < n; j += QK_K) dequant_q4_k(row + (k0 + j) / QK_K * 144, y + j);
            return;
        case DN_Q6_K:
            for (int64_t j = 0; j < n; j += QK_K) dequant_q6_k(row + (k0 + j) / QK_K * 210, y + j);
            return;
    }
}

}  // namespace dn
