// RMSNorm with the element-wise steps around it fused (dn_rms_norm, dn_rms_rope), and the fp32 ->
// bf16 narrowing of the matmuls' results (dn_to_bf16).
//
// Legend: R rows, D values per row (the normalized axis), T tokens.
//
// The model runs about a dozen norms per layer, on [C, H] rows and on the q/k/v heads, each in
// torch a chain of passes over the row: widen to fp32, square, mean, rsqrt, two products, narrow
// back, and then an add, a scale or the rotary product in more passes. At the small model's
// shapes that chain was ~10% of a step. Here each row is read once and written once.
//
// Every step rounds where torch's composition rounds (the row's activation dtype after the norm,
// after a residual add, after the layer scale; fp32 inside the rotary product), and the build has
// -ffp-contract=off, so the only difference from torch is the order of the mean's sum: results
// agree to an fp32 rounding of the norm's scale, which a bf16 output almost always absorbs.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "bf16.h"
#include "blocks.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Two paths per row. The portable one passes the row through an fp32 scratch: widened on load,
// rounded to the activation dtype in place where torch rounds, narrowed on store, with plain
// fp32 loops between. The AVX-512 one (rows of a multiple of 16 values, and for the rotary a
// half row of a multiple of 16) keeps 16 values in a register from load to store: one pass for
// the sum of squares, one for the rest. They differ only in the order of the sum.

// bf16 rounding of u's fp32 bits (nearest even, NaN kept quiet), as the high 16 bits of the result.
inline uint32_t bf16_round_bits(uint32_t u) {
    return (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x400000u) & 0xffff0000u
                                           : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

#if defined(__AVX512F__)
inline __m512i bf16_round_bits(__m512i u) {
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_and_si512(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), hi);
    const __m512i mag = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(mag, _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_and_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)), hi);
}

// bf16 bits of 16 values in the low halves of 32-bit lanes. vcvtneps2bf16 rounds as
// bf16_round_bits does (nearest even, NaN made quiet) except that it flushes fp32 subnormals to
// zero, so a vector holding one takes the integer rounding.
inline __m512i bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
#if DN_AVX512BF16
    const __m512i exp = _mm512_set1_epi32(0x7f800000);
    const __mmask16 tiny = _mm512_testn_epi32_mask(u, exp) & _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x7fffff));
    if (!tiny) return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v));
#endif
    return _mm512_srli_epi32(bf16_round_bits(u), 16);
}
#endif

// v[0..n) rounded to bf16 (kept as fp32 values).
inline void round_bf16(float* v, int64_t n) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_si512(v + j, _mm512_slli_epi32(bf16_bits(_mm512_loadu_ps(v + j)), 16));
#endif
    for (; j < n; ++j) {
        uint32_t u;
        memcpy(&u, v + j, 4);
        u = bf16_round_bits(u);
        memcpy(v + j, &u, 4);
    }
}

inline void load_row(const uint16_t* p, int64_t n, float* v) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_si512(v + j, _mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p + j))), 16));
#endif
    for (; j < n; ++j) v[j] = dn::bf16_to_f32(p[j]);
}
inline void load_row(const float* p, int64_t n, float* v) { memcpy(v, p, (size_t)n * 4); }

// v already holds bf16 values (round_bf16), so narrowing is a truncation.
inline void store_row(const float* v, int64_t n, uint16_t* p) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16)
        _mm256_storeu_si256((__m256i*)(p + j),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_loadu_si512(v + j), 16)));
#endif
    for (; j < n; ++j) {
        uint32_t u;
        memcpy(&u, v + j, 4);
        p[j] = (uint16_t)(u >> 16);
    }
}
inline void store_row(const float* v, int64_t n, float* p) { memcpy(p, v, (size_t)n * 4); }

template <typename T> inline void round_to(float* v, int64_t n);
template <> inline void round_to<uint16_t>(float* v, int64_t n) { round_bf16(v, n); }
template <> inline void round_to<float>(float*, int64_t) {}

// 1 / sqrt(sum / D + eps), as torch's mean then rsqrt (1 / sqrt).
inline float inv_rms_of(float sum, int64_t D, float eps) { return 1.0f / sqrtf(sum / (float)D + eps); }

// ---- portable rows --------------------------------------------------------------------------

// Sum of s[0..D)^2 in 16 lanes.
inline float sum_squares(const float* s, int64_t D) {
    float lane[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= D; j += 16)
        for (int l = 0; l < 16; ++l) lane[l] += s[j + l] * s[j + l];
    for (; j < D; ++j) lane[j & 15] += s[j] * s[j];
    float sum = 0.0f;
    for (int l = 0; l < 16; ++l) sum += lane[l];
    return sum;
}

// y = rms(x (+ x2, rounded)) (* w), rounded to T; s and t are scratch rows.
template <typename T>
void norm_row(const T* x, const T* x2, int64_t D, const float* w, float eps, float* s, float* y, float* t) {
    load_row(x, D, s);
    if (x2) {
        load_row(x2, D, t);
        for (int64_t j = 0; j < D; ++j) s[j] = s[j] + t[j];
        round_to<T>(s, D);
    }
    const float r = inv_rms_of(sum_squares(s, D), D, eps);
    if (w)
        for (int64_t j = 0; j < D; ++j) y[j] = (s[j] * r) * w[j];
    else
        for (int64_t j = 0; j < D; ++j) y[j] = s[j] * r;
    round_to<T>(y, D);
}

template <typename T>
void norm_add_row(const T* x, const T* x2, int64_t D, const float* w, float eps, const T* add, float scale,
                  T* out, float* scratch) {
    float *s = scratch, *y = s + D, *t = y + D;
    norm_row<T>(x, x2, D, w, eps, s, y, t);
    if (add) {
        load_row(add, D, t);
        for (int64_t j = 0; j < D; ++j) y[j] = t[j] + y[j];
        round_to<T>(y, D);
    }
    if (scale != 1.0f) {
        for (int64_t j = 0; j < D; ++j) y[j] = y[j] * scale;
        round_to<T>(y, D);
    }
    store_row(y, D, out);
}

// torch's y * cos + rotate_half(y) * sin, each product and the sum rounded in fp32.
template <typename T>
void norm_rope_row(const T* x, int64_t D, const float* w, float eps, const float* c, const float* sn, T* out,
                   float* scratch) {
    float *s = scratch, *y = s + D, *z = y + D;
    const int64_t half = D / 2;
    norm_row<T>(x, nullptr, D, w, eps, s, y, z);
    for (int64_t j = 0; j < half; ++j) z[j] = y[j] * c[j] + (-y[j + half]) * sn[j];
    for (int64_t j = half; j < D; ++j) z[j] = y[j] * c[j] + y[j - half] * sn[j];
    round_to<T>(z, D);
    store_row(z, D, out);
}

// ---- AVX-512 rows ---------------------------------------------------------------------------
#if defined(__AVX512F__)
inline __m512 vload(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 vload(const float* p) { return _mm512_loadu_ps(p); }
template <typename T> inline __m512 vround(__m512 v);
template <> inline __m512 vround<uint16_t>(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
}
template <> inline __m512 vround<float>(__m512 v) { return v; }
// v holds bf16 values already (vround), so narrowing is a truncation.
inline void vstore(uint16_t* p, __m512 v) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
inline void vstore(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

template <typename T> inline __m512 vsource(const T* x, const T* x2, int64_t j) {
    return x2 ? vround<T>(_mm512_add_ps(vload(x + j), vload(x2 + j))) : vload(x + j);
}

// 1 / rms of x (+ x2) over D values (D a multiple of 16), in four accumulators.
template <typename T> inline float vinv_rms(const T* x, const T* x2, int64_t D, float eps) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < D; j += 16) {
        const __m512 v = vsource(x, x2, j);
        acc[(j >> 4) & 3] = _mm512_add_ps(acc[(j >> 4) & 3], _mm512_mul_ps(v, v));
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    return inv_rms_of(_mm512_reduce_add_ps(sum), D, eps);
}

template <typename T> inline __m512 vnorm(const T* x, const T* x2, int64_t j, __m512 r, const float* w) {
    __m512 y = _mm512_mul_ps(vsource(x, x2, j), r);
    if (w) y = _mm512_mul_ps(y, _mm512_loadu_ps(w + j));
    return vround<T>(y);
}

template <typename T>
void vnorm_add_row(const T* x, const T* x2, int64_t D, const float* w, float eps, const T* add, float scale,
                   T* out) {
    const __m512 r = _mm512_set1_ps(vinv_rms(x, x2, D, eps)), sc = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < D; j += 16) {
        __m512 y = vnorm(x, x2, j, r, w);
        if (add) y = vround<T>(_mm512_add_ps(vload(add + j), y));
        if (scale != 1.0f) y = vround<T>(_mm512_mul_ps(y, sc));
        vstore(out + j, y);
    }
}

template <typename T>
void vnorm_rope_row(const T* x, int64_t D, const float* w, float eps, const float* c, const float* sn, T* out) {
    const __m512 r = _mm512_set1_ps(vinv_rms<T>(x, nullptr, D, eps));
    const int64_t half = D / 2;
    for (int64_t j = 0; j < half; j += 16) {
        const __m512 lo = vnorm<T>(x, nullptr, j, r, w), hi = vnorm<T>(x, nullptr, j + half, r, w);
        const __m512 out_lo = _mm512_add_ps(_mm512_mul_ps(lo, _mm512_loadu_ps(c + j)),
                                            _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi),
                                                          _mm512_loadu_ps(sn + j)));
        const __m512 out_hi = _mm512_add_ps(_mm512_mul_ps(hi, _mm512_loadu_ps(c + j + half)),
                                            _mm512_mul_ps(lo, _mm512_loadu_ps(sn + j + half)));
        vstore(out + j, vround<T>(out_lo));
        vstore(out + j + half, vround<T>(out_hi));
    }
}
constexpr bool kVector = true;
#else
constexpr bool kVector = false;
#endif

constexpr int64_t PAR_MIN = 1 << 15;   // values below which one thread does the whole call

template <typename T>
void rms_norm(const T* x, const T* x2, int64_t R, int64_t D, const float* w, float eps, const T* add,
              float scale, T* out, bool vector) {
#pragma omp parallel if (R * D >= PAR_MIN)
    {
        std::vector<float> scratch(vector ? 0 : 3 * D);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            const int64_t o = r * D;
#if defined(__AVX512F__)
            if (vector) {
                vnorm_add_row<T>(x + o, x2 ? x2 + o : nullptr, D, w, eps, add ? add + o : nullptr, scale, out + o);
                continue;
            }
#endif
            norm_add_row<T>(x + o, x2 ? x2 + o : nullptr, D, w, eps, add ? add + o : nullptr, scale, out + o,
                            scratch.data());
        }
    }
}

template <typename T>
void rms_rope(const T* x, int64_t tokens, int64_t heads, int64_t D, const float* w, float eps,
              const float* cos_t, const float* sin_t, T* out, bool vector) {
    const int64_t R = tokens * heads;
#pragma omp parallel if (R * D >= PAR_MIN)
    {
        std::vector<float> scratch(vector ? 0 : 3 * D);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            const float *c = cos_t + (r / heads) * D, *sn = sin_t + (r / heads) * D;
#if defined(__AVX512F__)
            if (vector) {
                vnorm_rope_row<T>(x + r * D, D, w, eps, c, sn, out + r * D);
                continue;
            }
#endif
            norm_rope_row<T>(x + r * D, D, w, eps, c, sn, out + r * D, scratch.data());
        }
    }
}

// dst[i] = bf16(src[i]) for i in [j0, j1) (nearest even, NaN quiet).
void narrow_span(const float* src, int64_t j0, int64_t j1, uint16_t* dst) {
    int64_t j = j0;
#if defined(__AVX512F__)
    for (; j + 16 <= j1; j += 16)
        _mm256_storeu_si256((__m256i*)(dst + j), _mm512_cvtepi32_epi16(bf16_bits(_mm512_loadu_ps(src + j))));
#endif
    for (; j < j1; ++j) {
        uint32_t u;
        memcpy(&u, src + j, 4);
        dst[j] = (uint16_t)(bf16_round_bits(u) >> 16);
    }
}

// f(j0, j1) over [0, n) in spans of 16k values, in parallel when n is large enough to pay.
template <typename F> void in_spans(int64_t n, F f) {
    constexpr int64_t SPAN = 1 << 14;
    const int64_t spans = (n + SPAN - 1) / SPAN;
#pragma omp parallel for schedule(static) if (n >= 4 * PAR_MIN)
    for (int64_t c = 0; c < spans; ++c) f(c * SPAN, std::min(n, (c + 1) * SPAN));
}

int g_portable = 0;   // dn_norm_portable(1): the portable rows even where AVX-512 is built in

}  // namespace

DN_API void dn_norm_portable(int on) { g_portable = on; }

DN_API int dn_round_bf16(float* x, int64_t n) {
    if (n < 0) return DN_E_SHAPE;
    in_spans(n, [&](int64_t j0, int64_t j1) { round_bf16(x + j0, j1 - j0); });
    return DN_OK;
}

DN_API int dn_to_bf16(const float* src, int64_t n, uint16_t* dst) {
    if (n < 0) return DN_E_SHAPE;
    in_spans(n, [&](int64_t j0, int64_t j1) { narrow_span(src, j0, j1, dst); });
    return DN_OK;
}

DN_API int dn_rms_norm(const void* x, const void* x2, int64_t R, int64_t D, int bf16, const float* w,
                       float eps, const void* add, float scale, void* out) {
    if (R < 0 || D <= 0) return DN_E_SHAPE;
    const bool vector = kVector && !g_portable && D % 16 == 0;
    if (bf16)
        rms_norm((const uint16_t*)x, (const uint16_t*)x2, R, D, w, eps, (const uint16_t*)add, scale,
                 (uint16_t*)out, vector);
    else
        rms_norm((const float*)x, (const float*)x2, R, D, w, eps, (const float*)add, scale, (float*)out, vector);
    return DN_OK;
}

DN_API int dn_rms_rope(const void* x, int64_t T, int64_t heads, int64_t D, int bf16, const float* w,
                       float eps, const float* cos_t, const float* sin_t, void* out) {
    if (T < 0 || heads <= 0 || D <= 0 || D % 2) return DN_E_SHAPE;
    const bool vector = kVector && !g_portable && D % 32 == 0;
    if (bf16)
        rms_rope((const uint16_t*)x, T, heads, D, w, eps, cos_t, sin_t, (uint16_t*)out, vector);
    else
        rms_rope((const float*)x, T, heads, D, w, eps, cos_t, sin_t, (float*)out, vector);
    return DN_OK;
}
