// The activations' int8 rounding for the int8 kernels (q8.cpp; the scheme is described there):
// per row and group of 32 values, xq = round-to-even(x * 127 / max|x|) and dx = max|x| / 127,
// with the sums each weight type's kernel starts from (q8.h's quantize_rows).
#include <math.h>
#include <string.h>

#include <cmath>
#include <limits>

#include <algorithm>

#include "blocks.h"
#include "q8.h"

namespace dn {
namespace {

constexpr int G = Q8_GROUP;

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
#elif DN_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {    // bf16 bits -> fp32, exactly
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline int32_t sum8(__m256i v) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    h = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
    return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 1)));
}

// The scalar loop's operations in 8 lanes, as the VNNI version does in 16.
template <typename X>
inline void quantize_group(const X* src, int8_t* q, float& d, const GroupSums& s) {
    __m256 v[4];
    const __m256i exp = _mm256_set1_epi32(0x7f800000);    // all exponent bits set: inf or NaN
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256i bad = _mm256_setzero_si256();
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
        v[i] = load8(src + 8 * i);
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v[i]), exp), exp));
        m = _mm256_max_ps(m, _mm256_and_ps(v[i], magnitude));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
    const bool any_bad = !_mm256_testz_si256(bad, bad);
    if (any_bad || !(amax >= Q8_TINY)) return special_group(q, d, s, !any_bad);
    const __m256 id = _mm256_set1_ps(127.0f / amax);
    __m256i qi[4];
    for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));   // round half to even
    // packs work per 128-bit lane: dword j of the packed bytes is values 4j'.. of vector j % 4,
    // lane j / 4; the permutation puts the 32 values back in order
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    d = amax / 127.0f;
    s.store(d, sum8(_mm256_add_epi32(qi[0], qi[1])), sum8(_mm256_add_epi32(qi[2], qi[3])));
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

}  // namespace

bool q8_type(int qtype) {
    return qtype == DN_Q4_K || qtype == DN_Q5_0 || qtype == DN_Q8_0 || qtype == DN_Q6_K;
}

int q8_sub(int qtype) { return qtype == DN_Q6_K ? G / 2 : G; }   // Q6_K: a scale per 16

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

}  // namespace dn

DN_API int dn_quantize_q8(const float* x, int64_t T, int64_t K, int qtype, int8_t* xq, float* dx, float* sx,
                          int32_t* zx) {
    if (!dn::q8_type(qtype)) return DN_E_QTYPE;
    if (T < 0 || K <= 0 || K % dn::G) return DN_E_SHAPE;
    dn::quantize_rows(x, T, K, qtype, xq, dx, sx, zx);
    return DN_OK;
}
