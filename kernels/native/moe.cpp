// Routed experts on quantized expert tensors (dn_moe, and dn_moe_bf16 for bf16 activations:
// the expert input and the gelu(gate)*up product are bf16, the matmuls accumulate in fp32;
// dn_moe_q8 / dn_moe_q8_bf16: both rounded to int8 instead, for the int8 kernels of q8.cpp).
//
// Legend: T tokens, K hidden, E experts, F expert width, A active experts per token, n tokens
// routed to one expert.
//
// Tokens are grouped by expert so each expert's weights are dequantized once per call (tile by
// tile, inside gemm) and reused by all its n tokens. Experts run one after another with the
// parallelism inside each matmul (the int8 variant: one expert per thread where there are enough
// experts), and their outputs are added into `out` in expert order, so the result does not depend
// on the thread count.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "blocks.h"
#include "gemm.h"
#include "q8.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

int max_threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

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
void gelu_rows(const float* gu, int64_t n, int64_t F, H* h, bool parallel = true) {
#pragma omp parallel for schedule(static) if (parallel && n * F > 16384)
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

// Above this many values (32 MB) of routed rows' outputs, moe_q8 runs one expert at a time.
constexpr int64_t BY_EXPERT_ROWS = (int64_t)8 << 20;

// The same with int8 products (q8.cpp): x is quantized once per token, gelu(gate) * up once per
// (expert, token), from fp32.
//
// With at least two experts in use per thread and at most BY_EXPERT_ROWS values of output, the
// experts run in parallel instead, one thread each from start to end: no fork or join per
// matmul, and no thread waits while another does the small steps between them (gelu, rounding).
// Each routed row's output then goes to a row of its own (the (token, expert) pair's position in
// the routing), and the rows are added into `out` per token, in expert order, as the
// one-expert-at-a-time loop adds them: the result is the same, whatever the thread count.
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
    std::vector<int64_t> used;                    // the experts with tokens, in expert order
    for (int64_t e = 0; e < E; ++e)
        if (rt.start[e + 1] > rt.start[e]) used.push_back(e);
    // (a long prompt's many tokens keep the other schedule: each expert's matmuls are then large
    // enough to split, and the rows' buffer would grow with T)
    const bool by_expert = (int64_t)used.size() >= 2 * max_threads() && max_threads() > 1 &&
                           T * A * K <= BY_EXPERT_ROWS;
    if (by_expert)                                // most tokens first: the threads end together
        std::stable_sort(used.begin(), used.end(), [&](int64_t a, int64_t b) {
            return rt.start[a + 1] - rt.start[a] > rt.start[b + 1] - rt.start[b];
        });
    std::vector<int8_t> xq(T * K);
    std::vector<float> dx(T * kg), sx(T * kf);
    std::vector<int32_t> zx(T * ki);
    dn::quantize_rows(x, T, K, gu_qtype, xq.data(), dx.data(), sx.data(), zx.data());
    // by_expert: every routed row's output, at its position in the routing [T * A, K]
    std::vector<float> rows(by_expert ? T * A * K : 0);
    int status = DN_OK;
    memset(out, 0, (size_t)(T * K) * sizeof(float));
#pragma omp parallel if (by_expert)
    {
        const int64_t nmax = rt.nmax;
        std::vector<int8_t> xs(nmax * K), hq(nmax * F);
        std::vector<float> dxs(nmax * kg), sxs(nmax * kf), dh(nmax * fg), sh(nmax * ff);
        std::vector<int32_t> zxs(nmax * ki), zh(nmax * fi);
        std::vector<float> gu(nmax * 2 * F), h(nmax * F), ys(by_expert ? 0 : nmax * K);
#pragma omp for schedule(dynamic, 1)
        for (size_t u = 0; u < used.size(); ++u) {   // by_expert or not: a thread's own loop
            const int64_t ee = used[u];
            const int64_t n = rt.start[ee + 1] - rt.start[ee], s0 = rt.start[ee];
            for (int64_t i = 0; i < n; ++i) {
                const int64_t t = rt.tok[s0 + i];
                memcpy(&xs[i * K], &xq[t * K], (size_t)K);
                memcpy(&dxs[i * kg], &dx[t * kg], (size_t)kg * sizeof(float));
                if (kf) memcpy(&sxs[i * kf], &sx[t * kf], (size_t)kf * sizeof(float));
                if (ki) memcpy(&zxs[i * ki], &zx[t * ki], (size_t)ki * sizeof(int32_t));
            }
            const bool inner = !by_expert;              // the matmuls' own threads
            float* y = by_expert ? rows.data() + s0 * K : ys.data();
            int rc = dn::gemm_q8(xs.data(), dxs.data(), sxs.data(), zxs.data(), n, K, gate_up + ee * 2 * F * gu_row,
                                 gu_qtype, 2 * F, gu.data(), inner);
            if (rc == DN_OK) {
                gelu_rows(gu.data(), n, F, h.data(), inner);
                dn::quantize_rows(h.data(), n, F, down_qtype, hq.data(), dh.data(), sh.data(), zh.data(), inner);
                rc = dn::gemm_q8(hq.data(), dh.data(), sh.data(), zh.data(), n, F, down + ee * K * down_row,
                                 down_qtype, K, y, inner);
            }
            if (rc != DN_OK) {
#pragma omp critical(dn_moe_status)
                status = rc;
            } else if (!by_expert) {
                add_weighted(y, n, K, &rt.tok[s0], &rt.wsel[s0], out);
            }
        }
    }
    if (status != DN_OK || !by_expert) return status;
    // out[t] = sum of w * row over t's routed rows, in routing order (expert-major)
    std::vector<int64_t> first(T + 1, 0), slot(T * A);
    for (int64_t p = 0; p < T * A; ++p) ++first[rt.tok[p] + 1];
    for (int64_t t = 0; t < T; ++t) first[t + 1] += first[t];
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t p = 0; p < T * A; ++p) slot[fill[rt.tok[p]]++] = p;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        float* o = out + t * K;
        for (int64_t i = first[t]; i < first[t + 1]; ++i) {
            const float wv = rt.wsel[slot[i]];
            const float* yv = rows.data() + slot[i] * K;
            for (int64_t j = 0; j < K; ++j) o[j] += yv[j] * wv;
        }
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
