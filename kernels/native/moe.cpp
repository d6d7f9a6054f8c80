// Routed experts on quantized expert tensors (dn_moe, and dn_moe_bf16 for bf16 activations:
// the expert input and the gelu(gate)*up product are bf16, the matmuls accumulate in fp32;
// dn_moe_q8 / dn_moe_q8_bf16: both rounded to int8 instead, for the int8 kernels of q8.cpp).
//
// Legend: T tokens, K hidden, E experts, F expert width, A active experts per token, n tokens
// routed to one expert.
//
// Tokens are grouped by expert so each expert's weights are dequantized once per call (tile by
// tile, inside gemm) and reused by all its n tokens. Experts run one after another with the
// parallelism inside each matmul, and their outputs are added into `out` in expert order, so
// the result does not depend on the thread count.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "blocks.h"
#include "gemm.h"
#include "q8.h"

namespace {

// gelu with the tanh approximation (gelu_pytorch_tanh), written as torch evaluates it.
inline float gelu_tanh(float v) {
    const float beta = 0.7978845608028654f;   // sqrt(2/pi)
    const float kappa = 0.044715f;
    const float inner = beta * (v + kappa * (v * v * v));
    return 0.5f * v * (1.0f + tanhf(inner));
}

#if defined(__AVX512F__)
// e^x for 16 lanes: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two parts so r is exact to
// fp32), e^r by its degree-6 Taylor polynomial (relative error < 2e-7 on that range), times 2^n
// built in the exponent bits. Inputs are clamped to [-87, 87], where e^x is a normal float.
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(87.0f)), _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// gelu_tanh(g) * u for 16 lanes, as g * sigmoid(2 inner) = g / (1 + e^(-2 inner)) (the same
// function as 0.5 g (1 + tanh(inner))).
inline __m512 gelu_mul16(__m512 g, __m512 u) {
    const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                       _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
    const __m512 e = exp16(_mm512_mul_ps(inner, _mm512_set1_ps(-2.0f)));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}
#endif

// Activations as the matmul takes them: fp32, or bf16 bits (rounded to nearest even).
inline void put(float v, float* p) { *p = v; }
inline void put(float v, uint16_t* p) { *p = dn::f32_to_bf16(v); }
inline int gemm_x(const float* x, int64_t T, int64_t K, const uint8_t* w, int q, int64_t N, float* y) {
    return dn::gemm(x, T, K, w, q, N, y);
}
inline int gemm_x(const uint16_t* x, int64_t T, int64_t K, const uint8_t* w, int q, int64_t N, float* y) {
    return dn::gemm_bf16(x, T, K, w, q, N, y);
}

// (token, weight) pairs grouped by expert, tokens ascending within an expert: expert e owns
// positions [start[e], start[e + 1]) of tok / wsel.
struct Routing {
    std::vector<int64_t> start, tok;
    std::vector<float> wsel;
    int64_t nmax = 0;
    Routing(const int64_t* ids, const float* weights, int64_t T, int64_t A, int64_t E)
        : start(E + 1, 0), tok(T * A), wsel(T * A) {
        for (int64_t i = 0; i < T * A; ++i) ++start[ids[i] + 1];
        for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
        std::vector<int64_t> fill(start.begin(), start.end() - 1);
        for (int64_t i = 0; i < T * A; ++i) {
            const int64_t p = fill[ids[i]]++;
            tok[p] = i / A;
            wsel[p] = weights[i];
        }
        for (int64_t e = 0; e < E; ++e) nmax = std::max(nmax, start[e + 1] - start[e]);
    }
};

// The argument checks both variants share; DN_OK when the call can go ahead.
int check(int64_t T, int64_t K, int gu_qtype, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
          int64_t A) {
    if (dn::block_info(gu_qtype).elems == 0 || dn::block_info(down_qtype).elems == 0) return DN_E_QTYPE;
    const int64_t gu_row = dn::row_bytes(gu_qtype, K), down_row = dn::row_bytes(down_qtype, F);
    if (T < 0 || K <= 0 || E <= 0 || F <= 0 || A < 0 || gu_row < 0 || down_row < 0) return DN_E_SHAPE;
    for (int64_t i = 0; i < T * A; ++i)
        if (ids[i] < 0 || ids[i] >= E) return DN_E_EXPERT;
    return DN_OK;
}

// h[i] = gelu_tanh(gate) * up for the n rows gu[i] = [gate | up] (F each).
template <typename H>
void gelu_rows(const float* gu, int64_t n, int64_t F, H* h) {
#pragma omp parallel for schedule(static) if (n * F > 16384)
    for (int64_t i = 0; i < n; ++i) {
        const float* g = gu + i * 2 * F;
        int64_t j = 0;
#if defined(__AVX512F__)
        alignas(64) float v[16];
        for (; j + 16 <= F; j += 16) {
            _mm512_store_ps(v, gelu_mul16(_mm512_loadu_ps(g + j), _mm512_loadu_ps(g + F + j)));
            for (int l = 0; l < 16; ++l) put(v[l], &h[i * F + j + l]);
        }
#endif
        for (; j < F; ++j) put(gelu_tanh(g[j]) * g[F + j], &h[i * F + j]);
    }
}

// out[tok[i]] += w[i] * ys[i] for an expert's n rows, in row order. The threads split the columns,
// not the rows: a caller may list one expert twice for a token, and two threads must never add
// into the same output row.
void add_weighted(const float* ys, int64_t n, int64_t K, const int64_t* tok, const float* w, float* out) {
    constexpr int64_t CB = 256;
    const int64_t blocks = (K + CB - 1) / CB;
#pragma omp parallel for schedule(static) if (n * K > 16384)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t j0 = b * CB, j1 = std::min(K, j0 + CB);
        for (int64_t i = 0; i < n; ++i) {
            float* o = out + tok[i] * K;
            const float wv = w[i];
            const float* yv = ys + i * K;
            for (int64_t j = j0; j < j1; ++j) o[j] += yv[j] * wv;
        }
    }
}

template <typename X>
int moe(const X* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
        const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
        const float* weights, int64_t A, float* out) {
    if (int rc = check(T, K, gu_qtype, down_qtype, E, F, ids, A)) return rc;
    const int64_t gu_row = dn::row_bytes(gu_qtype, K), down_row = dn::row_bytes(down_qtype, F);
    const Routing rt(ids, weights, T, A, E);
    const int64_t nmax = rt.nmax;
    std::vector<X> xs(nmax * K), h(nmax * F);
    std::vector<float> gu(nmax * 2 * F), ys(nmax * K);
    memset(out, 0, (size_t)(T * K) * sizeof(float));
    for (int64_t e = 0; e < E; ++e) {
        const int64_t n = rt.start[e + 1] - rt.start[e], s0 = rt.start[e];
        if (n == 0) continue;
        for (int64_t i = 0; i < n; ++i) memcpy(&xs[i * K], x + rt.tok[s0 + i] * K, (size_t)K * sizeof(X));
        int rc = gemm_x(xs.data(), n, K, gate_up + e * 2 * F * gu_row, gu_qtype, 2 * F, gu.data());
        if (rc) return rc;
        gelu_rows(gu.data(), n, F, h.data());
        rc = gemm_x(h.data(), n, F, down + e * K * down_row, down_qtype, K, ys.data());
        if (rc) return rc;
        add_weighted(ys.data(), n, K, &rt.tok[s0], &rt.wsel[s0], out);
    }
    return DN_OK;
}

// The same with int8 products (q8.cpp): x is quantized once per token, gelu(gate) * up once per
// (expert, token), from fp32.
template <typename X>
int moe_q8(const X* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
           const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
           const float* weights, int64_t A, float* out) {
    if (int rc = check(T, K, gu_qtype, down_qtype, E, F, ids, A)) return rc;
    if (!dn::q8_type(gu_qtype) || !dn::q8_type(down_qtype)) return DN_E_QTYPE;
    if (K % dn::Q8_GROUP || F % dn::Q8_GROUP) return DN_E_SHAPE;
    const int64_t gu_row = dn::row_bytes(gu_qtype, K), down_row = dn::row_bytes(down_qtype, F);
    // per row: kg scales and kf / ki float / int sums of x (rounded for gate_up), fg, ff, fi of h
    const int64_t kg = K / dn::Q8_GROUP, kf = dn::q8_float_sums(gu_qtype, K), ki = dn::q8_int_sums(gu_qtype, K);
    const int64_t fg = F / dn::Q8_GROUP, ff = dn::q8_float_sums(down_qtype, F), fi = dn::q8_int_sums(down_qtype, F);
    const Routing rt(ids, weights, T, A, E);
    const int64_t nmax = rt.nmax;
    std::vector<int8_t> xq(T * K), xs(nmax * K), hq(nmax * F);
    std::vector<float> dx(T * kg), sx(T * kf), dxs(nmax * kg), sxs(nmax * kf), dh(nmax * fg), sh(nmax * ff);
    std::vector<int32_t> zx(T * ki), zxs(nmax * ki), zh(nmax * fi);
    std::vector<float> gu(nmax * 2 * F), h(nmax * F), ys(nmax * K);
    dn::quantize_rows(x, T, K, gu_qtype, xq.data(), dx.data(), sx.data(), zx.data());
    memset(out, 0, (size_t)(T * K) * sizeof(float));
    for (int64_t e = 0; e < E; ++e) {
        const int64_t n = rt.start[e + 1] - rt.start[e], s0 = rt.start[e];
        if (n == 0) continue;
        for (int64_t i = 0; i < n; ++i) {
            const int64_t t = rt.tok[s0 + i];
            memcpy(&xs[i * K], &xq[t * K], (size_t)K);
            memcpy(&dxs[i * kg], &dx[t * kg], (size_t)kg * sizeof(float));
            if (kf) memcpy(&sxs[i * kf], &sx[t * kf], (size_t)kf * sizeof(float));
            if (ki) memcpy(&zxs[i * ki], &zx[t * ki], (size_t)ki * sizeof(int32_t));
        }
        int rc = dn::gemm_q8(xs.data(), dxs.data(), sxs.data(), zxs.data(), n, K, gate_up + e * 2 * F * gu_row,
                             gu_qtype, 2 * F, gu.data());
        if (rc) return rc;
        gelu_rows(gu.data(), n, F, h.data());
        dn::quantize_rows(h.data(), n, F, down_qtype, hq.data(), dh.data(), sh.data(), zh.data());
        rc = dn::gemm_q8(hq.data(), dh.data(), sh.data(), zh.data(), n, F, down + e * K * down_row, down_qtype, K,
                         ys.data());
        if (rc) return rc;
        add_weighted(ys.data(), n, K, &rt.tok[s0], &rt.wsel[s0], out);
    }
    return DN_OK;
}

}  // namespace

DN_API int dn_moe(const float* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
                  const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
                  const float* weights, int64_t A, float* out) {
    return moe(x, T, K, gate_up, gu_qtype, down, down_qtype, E, F, ids, weights, A, out);
}

DN_API int dn_moe_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
                       const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
                       const float* weights, int64_t A, float* out) {
    return moe(x, T, K, gate_up, gu_qtype, down, down_qtype, E, F, ids, weights, A, out);
}

DN_API int dn_moe_q8(const float* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
                     const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
                     const float* weights, int64_t A, float* out) {
    return moe_q8(x, T, K, gate_up, gu_qtype, down, down_qtype, E, F, ids, weights, A, out);
}

DN_API int dn_moe_q8_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
                          const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
                          const float* weights, int64_t A, float* out) {
    return moe_q8(x, T, K, gate_up, gu_qtype, down, down_qtype, E, F, ids, weights, A, out);
}
