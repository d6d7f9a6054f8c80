// Routed experts on quantized expert tensors (dn_moe).
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

namespace {

// gelu with the tanh approximation (gelu_pytorch_tanh), written as torch evaluates it.
inline float gelu_tanh(float v) {
    const float beta = 0.7978845608028654f;   // sqrt(2/pi)
    const float kappa = 0.044715f;
    const float inner = beta * (v + kappa * (v * v * v));
    return 0.5f * v * (1.0f + tanhf(inner));
}

}  // namespace

DN_API int dn_moe(const float* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
                  const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
                  const float* weights, int64_t A, float* out) {
    if (dn::block_info(gu_qtype).elems == 0 || dn::block_info(down_qtype).elems == 0) return DN_E_QTYPE;
    const int64_t gu_row = dn::row_bytes(gu_qtype, K), down_row = dn::row_bytes(down_qtype, F);
    if (T < 0 || K <= 0 || E <= 0 || F <= 0 || A < 0 || gu_row < 0 || down_row < 0) return DN_E_SHAPE;
    for (int64_t i = 0; i < T * A; ++i)
        if (ids[i] < 0 || ids[i] >= E) return DN_E_EXPERT;

    // (token, weight) pairs grouped by expert, tokens ascending within an expert.
    std::vector<int64_t> start(E + 1, 0), tok(T * A);
    std::vector<float> wsel(T * A);
    for (int64_t i = 0; i < T * A; ++i) ++start[ids[i] + 1];
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < T * A; ++i) {
        const int64_t p = fill[ids[i]]++;
        tok[p] = i / A;
        wsel[p] = weights[i];
    }
    int64_t nmax = 0;
    for (int64_t e = 0; e < E; ++e) nmax = std::max(nmax, start[e + 1] - start[e]);

    std::vector<float> xs(nmax * K), gu(nmax * 2 * F), h(nmax * F), ys(nmax * K);
    memset(out, 0, (size_t)(T * K) * sizeof(float));
    for (int64_t e = 0; e < E; ++e) {
        const int64_t n = start[e + 1] - start[e], s0 = start[e];
        if (n == 0) continue;
        for (int64_t i = 0; i < n; ++i) memcpy(&xs[i * K], x + tok[s0 + i] * K, (size_t)K * sizeof(float));
        int rc = dn::gemm(xs.data(), n, K, gate_up + e * 2 * F * gu_row, gu_qtype, 2 * F, gu.data());
        if (rc) return rc;
        for (int64_t i = 0; i < n; ++i)               // gu[i] = [gate | up]
            for (int64_t j = 0; j < F; ++j)
                h[i * F + j] = gelu_tanh(gu[i * 2 * F + j]) * gu[i * 2 * F + F + j];
        rc = dn::gemm(h.data(), n, F, down + e * K * down_row, down_qtype, K, ys.data());
        if (rc) return rc;
        for (int64_t i = 0; i < n; ++i) {
            float* o = out + tok[s0 + i] * K;
            const float wv = wsel[s0 + i];
            const float* yv = &ys[i * K];
            for (int64_t j = 0; j < K; ++j) o[j] += yv[j] * wv;
        }
    }
    return DN_OK;
}
