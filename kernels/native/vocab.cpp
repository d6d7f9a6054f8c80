// The vocabulary side of one denoising step in bf16 mode (dn_vocab, dn_draw_bf16).
//
// Legend: C rows (canvas positions), V columns (vocabulary).
//
// dn_vocab turns the head's logits into everything the sampler and the next step's
// self-conditioning need, one row at a time in a per-thread fp32 row buffer (V floats: 1 MB at
// V = 262144, so the row stays in L2 across the three passes), never a [C, V] fp32 temporary:
//   pass 1  z = cap tanh(l / cap), t = z / temperature, kept in the row buffer; max and argmax;
//   pass 2  e = exp(t - max) over the buffer (in place); S = sum e, Q = sum e (t - max);
//   pass 3  p = e / S written as bf16 (round to nearest even) into `probs`, which may be the
//           logits' own storage when they are bf16 (the row was read in pass 1).
// lse = max + log S and entropy = log S - Q / S (= -sum p log p, from the same sums).
// Every row is independent and reduced in a fixed order, so results do not depend on the number
// of threads.
//
// dn_draw_bf16 draws one index per row from those bf16 probabilities by the inverse CDF:
// the first v with p[0] + ... + p[v] > u * (p[0] + ... + p[V-1]) for a given uniform u in [0, 1).
// Sums are of 16-value chunks in fp32 (at most 15 roundings each) accumulated in fp64.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "blocks.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DN_V256 1
#else
#define DN_V256 0
#endif

namespace {

// cap * tanh(v / cap) for one value, from e^(-2|y|) (tanh |y| = (1 - e) / (1 + e)).
inline float softcap1(float v, float cap) {
    if (!(cap > 0)) return v;
    const float y = v / cap, e = expf(-2.0f * fabsf(y));
    const float th = (1.0f - e) / (1.0f + e);
    return cap * (y < 0 ? -th : th);
}

#if DN_V256
// e^x for 8 lanes: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so r is exact to fp32),
// e^r by its degree-6 Taylor polynomial (relative error < 2e-7 on that range), times 2^n built
// in the exponent bits. Inputs are clamped to [-87, 87]: e^-87 ~ 1.6e-38 stands for anything
// smaller (a probability below 1e-38 instead of a smaller one).
inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(87.0f)), _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// z = cap tanh(v / cap), 8 lanes, the same formula as softcap1.
inline __m256 softcap8(__m256 v, float cap) {
    const __m256 y = _mm256_div_ps(v, _mm256_set1_ps(cap));
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 ay = _mm256_andnot_ps(sign, y);
    const __m256 e = exp8(_mm256_mul_ps(ay, _mm256_set1_ps(-2.0f)));
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 th = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    th = _mm256_or_ps(th, _mm256_and_ps(y, sign));
    return _mm256_mul_ps(th, _mm256_set1_ps(cap));
}

// fp32 -> bf16 bits, round to nearest even (finite inputs: these are probabilities), 8 lanes.
inline __m128i to_bf16_8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

inline float hsum8(__m256 v) {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}
#endif

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return dn::bf16_to_f32(*p); }

// Values per fp32 partial sum before it joins the fp64 total: at most 64 terms per fp32 sum on
// every build (8 lanes x 64 with AVX2, one running sum of 64 otherwise).
#if DN_V256
constexpr int64_t CHUNK = 512;
#else
constexpr int64_t CHUNK = 64;
#endif

struct RowStats {
    int64_t argmax;
    float lse, entropy;
};

// One row: logits l[V] -> buf[V] scratch, probs[V] bf16 (may alias l when L is uint16_t).
template <typename L>
RowStats row(const L* l, int64_t V, float cap, float temp, float* buf, uint16_t* probs) {
    int64_t v = 0;
    // pass 1: tempered softcapped logits, max and first argmax
    float best = -INFINITY;
    int64_t arg = 0;
#if DN_V256
    {
        __m256 mx = _mm256_set1_ps(-INFINITY);
        __m256i ix = _mm256_setzero_si256(), cur = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i step = _mm256_set1_epi32(8);
        const __m256 T = _mm256_set1_ps(temp);
        const int64_t V8 = V / 8 * 8;
        for (; v < V8; v += 8) {
            __m256 z = load8(l + v);
            if (cap > 0) z = softcap8(z, cap);
            const __m256 t = _mm256_div_ps(z, T);
            _mm256_storeu_ps(buf + v, t);
            const __m256 gt = _mm256_cmp_ps(t, mx, _CMP_GT_OQ);     // strictly greater: first max per lane
            mx = _mm256_blendv_ps(mx, t, gt);
            ix = _mm256_blendv_epi8(ix, cur, _mm256_castps_si256(gt));
            cur = _mm256_add_epi32(cur, step);
        }
        if (V8 > 0) {
            alignas(32) float mv[8];
            alignas(32) int32_t iv[8];
            _mm256_store_ps(mv, mx);
            _mm256_store_si256((__m256i*)iv, ix);
            for (int j = 0; j < 8; ++j)
                if (mv[j] > best || (mv[j] == best && iv[j] < arg)) { best = mv[j]; arg = iv[j]; }
        }
    }
#endif
    for (; v < V; ++v) {
        const float t = softcap1(load1(l + v), cap) / temp;
        buf[v] = t;
        if (t > best) { best = t; arg = v; }
    }
    // pass 2: e = exp(t - max) in place; S and Q summed per CHUNK in fp32, chunks in fp64
    double S = 0, Q = 0;
    for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
        const int64_t c1 = std::min(V, c0 + CHUNK);
        v = c0;
#if DN_V256
        {
            __m256 s = _mm256_setzero_ps(), q = _mm256_setzero_ps();
            const __m256 m = _mm256_set1_ps(best);
            for (; v + 8 <= c1; v += 8) {
                const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(buf + v), m);
                const __m256 e = exp8(d);
                _mm256_storeu_ps(buf + v, e);
                s = _mm256_add_ps(s, e);
                q = _mm256_fmadd_ps(e, d, q);
            }
            S += (double)hsum8(s);
            Q += (double)hsum8(q);
        }
#endif
        float s = 0, q = 0;
        for (; v < c1; ++v) {
            const float d = buf[v] - best, e = expf(d);
            buf[v] = e;
            s += e;
            q += e * d;
        }
        S += s;
        Q += q;
    }
    // pass 3: p = e / S as bf16
    const float inv = (float)(1.0 / S);
    v = 0;
#if DN_V256
    {
        const __m256 r = _mm256_set1_ps(inv);
        const int64_t V8 = V / 8 * 8;
        for (; v < V8; v += 8)
            _mm_storeu_si128((__m128i*)(probs + v), to_bf16_8(_mm256_mul_ps(_mm256_loadu_ps(buf + v), r)));
    }
#endif
    for (; v < V; ++v) probs[v] = dn::f32_to_bf16(buf[v] * inv);
    const double logS = log(S);
    return {arg, (float)(best + logS), (float)(logS - Q / S)};
}

template <typename L>
int vocab(const L* logits, int64_t C, int64_t V, float cap, float temp, uint16_t* probs,
          int64_t* argmax, float* lse, float* entropy) {
    if (C < 0 || V <= 0 || V >= ((int64_t)1 << 31)) return DN_E_SHAPE;
    if (!(temp > 0)) return DN_E_SHAPE;
#pragma omp parallel if (C > 1)
    {
        std::vector<float> buf((size_t)V);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; ++c) {
            const RowStats r = row(logits + c * V, V, cap, temp, buf.data(), probs + c * V);
            argmax[c] = r.argmax;
            lse[c] = r.lse;
            entropy[c] = r.entropy;
        }
    }
    return DN_OK;
}

// Sum of p[0, n) in fp32, n <= 16.
inline float chunk_sum(const uint16_t* p, int64_t n) {
#if DN_V256
    if (n == 16) return hsum8(_mm256_add_ps(load8(p), load8(p + 8)));
#endif
    float s = 0;
    for (int64_t j = 0; j < n; ++j) s += dn::bf16_to_f32(p[j]);
    return s;
}

}  // namespace

DN_API int dn_vocab(const float* logits, int64_t C, int64_t V, float cap, float temperature,
                    uint16_t* probs, int64_t* argmax, float* lse, float* entropy) {
    return vocab(logits, C, V, cap, temperature, probs, argmax, lse, entropy);
}

DN_API int dn_vocab_from_bf16(const uint16_t* logits, int64_t C, int64_t V, float cap, float temperature,
                              uint16_t* probs, int64_t* argmax, float* lse, float* entropy) {
    return vocab(logits, C, V, cap, temperature, probs, argmax, lse, entropy);
}

DN_API int dn_softcap(float* x, int64_t n, float cap) {
    if (n < 0) return DN_E_SHAPE;
    if (!(cap > 0)) return DN_OK;
    constexpr int64_t SPAN = 1 << 14;
    const int64_t spans = (n + SPAN - 1) / SPAN;
#pragma omp parallel for schedule(static) if (spans > 4)
    for (int64_t c = 0; c < spans; ++c) {
        int64_t j = c * SPAN;
        const int64_t end = std::min(n, j + SPAN);
#if DN_V256
        for (; j + 8 <= end; j += 8) {   // NaN stays NaN (softcap8 alone clamps it into range)
            const __m256 v = _mm256_loadu_ps(x + j);
            _mm256_storeu_ps(x + j, _mm256_blendv_ps(softcap8(v, cap), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        }
#endif
        for (; j < end; ++j) x[j] = softcap1(x[j], cap);
    }
    return DN_OK;
}

DN_API int dn_draw_bf16(const uint16_t* probs, int64_t C, int64_t V, const double* u, int64_t* out) {
    if (C < 0 || V <= 0) return DN_E_SHAPE;
#pragma omp parallel for schedule(static) if (C > 1)
    for (int64_t c = 0; c < C; ++c) {
        const uint16_t* p = probs + c * V;
        double total = 0;
        for (int64_t v = 0; v < V; v += 16) total += chunk_sum(p + v, std::min<int64_t>(16, V - v));
        const double thr = u[c] * total;
        double run = 0;
        int64_t pick = -1;
        for (int64_t v = 0; v < V && pick < 0; v += 16) {
            const int64_t n = std::min<int64_t>(16, V - v);
            const double s = chunk_sum(p + v, n);
            if (run + s <= thr) {
                run += s;
                continue;
            }
            for (int64_t j = 0; j < n; ++j) {         // the crossing is in this chunk: walk it
                const float pj = dn::bf16_to_f32(p[v + j]);
                run += pj;
                if (run > thr && pj > 0) { pick = v + j; break; }
            }
        }
        if (pick < 0)        // rounding left thr at the very top: the last index with p > 0
            for (pick = V - 1; pick > 0 && !(dn::bf16_to_f32(p[pick]) > 0); --pick) {}
        out[c] = pick;
    }
    return DN_OK;
}
