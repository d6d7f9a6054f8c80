// torch.multinomial(probs, 1, generator) for a CPU generator, draw for draw (dn_sample).
//
// Legend: C rows (canvas positions), V columns (vocabulary).
//
// What torch does for one sample per row: an exponential race, index = argmax_v p[v] / q[v] with
// q = float(-log1p(-u)), one uniform u per entry in row-major order, u = (53 low bits of
// (a << 32 | b)) * 2^-53 from two consecutive 32-bit MT19937 outputs a, b. Its CPU kernel does
// this one entry at a time with a scalar log1p (~15 ns an entry). Here the generator runs
// serially (it must: every draw depends on the state) into a buffer for a block of rows, and the
// log, the division and the argmax run in parallel over the block's rows.
//
// -log1p(-u) is computed as -log(1 - u): 1 - u is exact in double for these u (multiples of
// 2^-53), and `dlog` is the classic argument reduction + degree-14 odd series of log, accurate to
// about one ulp of a double, which the rounding to float then absorbs (tests/test_native.py checks
// tokens and generator state against torch.multinomial).
//
// The generator state is passed as torch's own state bytes (Generator.get_state()): the 32-bit
// MT19937 words stored as uint64 at byte 24, `left` (int32) at 8 and `next` (uint64) at 16.
// diffcli/compute/native.py checks that layout against torch once before using this.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "diffcli_native.h"

namespace {

constexpr int N = 624, M = 397;
constexpr uint32_t MATRIX_A = 0x9908b0dfu, UPPER = 0x80000000u, LOWER = 0x7fffffffu;

inline uint32_t mix(uint32_t u, uint32_t v) {
    const uint32_t y = (u & UPPER) | (v & LOWER);
    return (y >> 1) ^ ((v & 1u) ? MATRIX_A : 0u);
}

struct MT19937 {
    uint32_t s[N];
    int32_t left;
    uint64_t next;

    void regenerate() {
        int i = 0;
        for (; i < N - M; ++i) s[i] = s[i + M] ^ mix(s[i], s[i + 1]);
        for (; i < N - 1; ++i) s[i] = s[i + M - N] ^ mix(s[i], s[i + 1]);
        s[N - 1] = s[M - 1] ^ mix(s[N - 1], s[0]);
        left = N;
        next = 0;
    }

    inline uint32_t draw() {
        if (--left == 0) regenerate();
        uint32_t y = s[next++];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        return y ^ (y >> 18);
    }
};

// Natural log of v in (0, 1]: v = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = f - f^2/2 + s (f^2/2 + R)
// with f = m - 1, s = f / (2 + f) and R(s^2) the series of 2 atanh(s) - 2s beyond its first term,
// e ln2 added in two parts.
inline double dlog(double v) {
    uint64_t b;
    memcpy(&b, &v, 8);
    int64_t e = (int64_t)(b >> 52) - 1023;
    const uint64_t mb = (b & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;
    double m;
    memcpy(&m, &mb, 8);
    const bool big = m > 1.4142135623730951;
    m = big ? m * 0.5 : m;
    e += big;
    const double f = m - 1.0, hfsq = 0.5 * f * f, s = f / (2.0 + f), z = s * s, w = z * z;
    const double t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
    const double t2 = z * (6.666666666666735130e-01 +
                           w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
    const double k = (double)e;
    return k * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + t2 + t1) + k * 1.90821492927058770002e-10)) - f);
}

}  // namespace

DN_API int dn_sample(const float* probs, int64_t C, int64_t V, uint8_t* torch_state, int64_t* out) {
    if (C < 0 || V <= 0) return DN_E_SHAPE;
    MT19937 mt;
    uint64_t words[N];
    memcpy(&mt.left, torch_state + 8, 4);
    memcpy(&mt.next, torch_state + 16, 8);
    memcpy(words, torch_state + 24, sizeof(words));
    for (int i = 0; i < N; ++i) mt.s[i] = (uint32_t)words[i];
    if (mt.left < 1 || mt.left > N || mt.next > (uint64_t)N) return DN_E_SHAPE;

    const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(C, (int64_t)(4 << 20) / V));  // ~32 MB of u
    std::vector<double> u((size_t)(rows * V));
    for (int64_t c0 = 0; c0 < C; c0 += rows) {
        const int64_t nr = std::min(rows, C - c0);
        for (int64_t i = 0; i < nr * V; ++i) {
            const uint64_t a = mt.draw(), b = mt.draw();
            u[i] = (double)(((a << 32) | b) & ((1ULL << 53) - 1)) * 0x1p-53;
        }
#pragma omp parallel for schedule(static) if (nr > 1)
        for (int64_t r = 0; r < nr; ++r) {
            const float* p = probs + (c0 + r) * V;
            const double* ur = u.data() + r * V;
            std::vector<float> ratio((size_t)V);
            for (int64_t v = 0; v < V; ++v) {
                const float q = (float)(0.0 - dlog(1.0 - ur[v]));   // 0.0 - x: +0 when u = 0, as torch
                ratio[v] = p[v] / q;
            }
            int64_t best = 0;                                        // first maximum; NaN wins, as argmax
            float top = ratio[0];
            if (!isnan(top)) {
                for (int64_t v = 1; v < V; ++v) {
                    if (isnan(ratio[v])) { best = v; break; }
                    if (ratio[v] > top) { top = ratio[v]; best = v; }
                }
            }
            out[c0 + r] = best;
        }
    }
    for (int i = 0; i < N; ++i) words[i] = mt.s[i];
    memcpy(torch_state + 8, &mt.left, 4);
    memcpy(torch_state + 16, &mt.next, 8);
    memcpy(torch_state + 24, words, sizeof(words));
    return DN_OK;
}
