// The bf16 matmuls on Intel AMX tiles (TDPBF16PS), used by gemm_bf16 (dn_qmatmul_bf16, dn_moe_bf16)
// and gemm_t_bf16 (dn_qmatmul_t_bf16) when the CPU has AMX-BF16 and Linux lets the process use
// the tile registers; everywhere else those fall back to the AVX512-BF16 / fp32 kernels.
//
// Legend: T activation rows, K in-features, N weight rows, Kp / Tp K and T rounded up to a tile
// (32 values of K, 16 rows of T), "pair" two bf16 values adjacent along the reduction packed in
// 32 bits (low half first), the layout TDPBF16PS takes for its second operand.
//
// One TDPBF16PS multiplies a 16 x 32 bf16 tile A by a 32 x 16 tile B given as 16 rows of 16 pairs,
// adding the 16 x 16 fp32 products into a tile C: 8192 multiply-adds in one instruction. There are
// eight tile registers; both kernels use four accumulators (2 x 2 blocks of 16 x 16), two A and
// two B tiles, so every loaded tile feeds two products.
//
// gemm (y = x W^T): the weight rows are A and the activations are B, so a weight tile is decoded
// row-major (no transpose) and the activations are packed into pairs once per call:
//   per weight tile of 32 rows (one task): decode the rows to bf16 [32][Kp] (L2-sized), then for
//   every two blocks of 16 activation rows: C[32 weight rows][32 rows of x] over all of K in the
//   tiles, stored once and transposed into y.
// gemm_t (y = x W, the reduction over W's rows): x rows are A, copied a chunk of 256 columns at a
// time; W's rows are decoded in pairs into B ([128][256] pairs per chunk and 256-wide column
// slice). Partial sums as in gemm_t.cpp (a fixed split of N in parts, added in order), so results
// do not depend on threads.
#include "amx.h"

#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "bf16.h"
#include "blocks.h"
#include "gemm.h"

#if DN_AVX512BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define DN_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define DN_AMX 0
#endif

namespace dn {

#if DN_AMX
namespace {

constexpr int ARCH_REQ_XCOMP_PERM = 0x1023;   // Linux arch_prctl: ask for an XSAVE feature
constexpr int XFEATURE_XTILEDATA = 18;

// CPUID.(7,0):EDX bit 24 AMX-TILE, bit 22 AMX-BF16; then the kernel's permission for the tile
// data state (without it the first tile instruction faults). Asked once per process.
bool probe() {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return false;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

std::atomic<int> g_enabled{1};

// The tile palette: eight tiles of 16 rows x 64 bytes.
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

void configure_tiles() {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
}

void* aligned(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

struct Buffer {
    void* p;
    explicit Buffer(size_t bytes) : p(aligned(bytes)) {}
    ~Buffer() { free(p); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
};

// x [T][K] bf16 -> xb [Tp/16][Kp/2][16] pairs (zeros outside x).
void pack_pairs(const uint16_t* x, int64_t T, int64_t K, int64_t Kp, uint32_t* xb) {
    const int64_t blocks = (T + 15) / 16, K2 = Kp / 2;
#pragma omp parallel for schedule(static) if (T * K > 65536)
    for (int64_t b = 0; b < blocks; ++b) {
        uint32_t* dst = xb + b * K2 * 16;
        memset(dst, 0, (size_t)(K2 * 16) * 4);
        for (int64_t c = 0; c < 16 && b * 16 + c < T; ++c) {
            const uint16_t* src = x + (b * 16 + c) * K;
            for (int64_t k = 0; k + 1 < K; k += 2) memcpy(dst + (k / 2) * 16 + c, src + k, 4);
            if (K % 2) dst[(K / 2) * 16 + c] = src[K - 1];
        }
    }
}

// C tiles 0, 2 (and 1, 3 for NB = 2) += A (tiles 4, 5: weight rows 0-15 and 16-31 of wa [32][Kp])
// . B (tiles 6, 7: the blocks of 16 x rows at xb0, xb1), over all of Kp.
template <int NB>
void accumulate(const uint16_t* wa, int64_t Kp, const uint32_t* xb0, const uint32_t* xb1) {
    for (int64_t k = 0; k < Kp; k += 32) {
        _tile_loadd(4, wa + k, Kp * 2);
        _tile_loadd(5, wa + 16 * Kp + k, Kp * 2);
        _tile_loadd(6, xb0 + k / 2 * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (NB == 2) {
            _tile_loadd(7, xb1 + k / 2 * 16, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
}

template <int NB>
void zero_acc() {
    _tile_zero(0);
    _tile_zero(2);
    if (NB == 2) {
        _tile_zero(1);
        _tile_zero(3);
    }
}

// The sums of the weight tile's nr rows at n0 for the NB blocks of x rows from t0 -> y (transposed).
template <int NB>
void store_acc(int64_t t0, int64_t T, int64_t n0, int nr, int64_t N, float* y) {
    alignas(64) float c[4][16][16];   // [tile][weight row][x row]
    _tile_stored(0, c[0], 64);
    _tile_stored(2, c[2], 64);
    if (NB == 2) {
        _tile_stored(1, c[1], 64);
        _tile_stored(3, c[3], 64);
    }
    for (int b = 0; b < NB; ++b)
        for (int j = 0; j < 16 && t0 + 16 * b + j < T; ++j) {
            float* dst = y + (t0 + 16 * b + j) * N + n0;
            for (int r = 0; r < nr; ++r) dst[r] = c[(r >> 4) * 2 + b][r & 15][j];
        }
}

}  // namespace

bool amx_available() {
    static const bool ok = probe();
    return ok;
}

bool amx_active() { return amx_available() && g_enabled.load(std::memory_order_relaxed); }

void amx_enable(bool on) { g_enabled.store(on ? 1 : 0, std::memory_order_relaxed); }

int gemm_bf16_amx(const uint16_t* x, int64_t T, int64_t K, const uint8_t* w, int64_t rb, int qtype,
                  int64_t N, float* y) {
    const int64_t Kp = (K + 31) / 32 * 32, K2 = Kp / 2;
    const int64_t xblocks = (T + 15) / 16, tiles = (N + 31) / 32;
    Buffer xb((size_t)(xblocks * K2 * 16) * 4);
    pack_pairs(x, T, K, Kp, (uint32_t*)xb.p);
    const uint32_t* xp = (const uint32_t*)xb.p;
#pragma omp parallel if (tiles > 1)
    {
        configure_tiles();
        Buffer wa((size_t)(32 * Kp) * 2);
        uint16_t* rows = (uint16_t*)wa.p;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < tiles; ++i) {
            const int64_t n0 = i * 32;
            const int nr = (int)std::min<int64_t>(32, N - n0);
            // the tile's rows decoded once (L2-sized), then multiplied into every block of x rows
            for (int r = 0; r < nr; ++r) decode_span(qtype, w + (n0 + r) * rb, 0, K, Kp, rows + r * Kp);
            if (nr < 32) memset(rows + nr * Kp, 0, (size_t)((32 - nr) * Kp) * 2);
            int64_t b = 0;
            for (; b + 2 <= xblocks; b += 2) {
                zero_acc<2>();
                accumulate<2>(rows, Kp, xp + b * K2 * 16, xp + (b + 1) * K2 * 16);
                store_acc<2>(b * 16, T, n0, nr, N, y);
            }
            if (b < xblocks) {
                zero_acc<1>();
                accumulate<1>(rows, Kp, xp + b * K2 * 16, nullptr);
                store_acc<1>(b * 16, T, n0, nr, N, y);
            }
        }
        _tile_release();
    }
    return DN_OK;
}

namespace {

constexpr int64_t KS = 256;      // output columns per slice (one block of a K-quant)
constexpr int64_t NC = 256;      // weight rows per chunk (reduction values per C load/store)
constexpr int64_t PARTS = 4;     // fixed split of N, as in gemm_t.cpp
constexpr int64_t GS = 3;        // slices per task (they share one copy of the x chunk)

// acc[16 NB rows][KS] (row stride KS) += A rows (of the x chunk [Tp][NC]) . wv, for the columns
// [j, j + 32).
template <int NB>
void chunk_tiles(const uint16_t* a0, const uint16_t* a1, const uint32_t* wv, float* acc0, float* acc1,
                 int64_t j) {
    _tile_loadd(0, acc0 + j, KS * 4);
    _tile_loadd(1, acc0 + j + 16, KS * 4);
    if (NB == 2) {
        _tile_loadd(2, acc1 + j, KS * 4);
        _tile_loadd(3, acc1 + j + 16, KS * 4);
    }
    for (int64_t n = 0; n < NC; n += 32) {
        _tile_loadd(4, a0 + n, NC * 2);
        _tile_loadd(6, wv + n / 2 * KS + j, KS * 4);
        _tile_loadd(7, wv + n / 2 * KS + j + 16, KS * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (NB == 2) {
            _tile_loadd(5, a1 + n, NC * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, acc0 + j, KS * 4);
    _tile_stored(1, acc0 + j + 16, KS * 4);
    if (NB == 2) {
        _tile_stored(2, acc1 + j, KS * 4);
        _tile_stored(3, acc1 + j + 16, KS * 4);
    }
}

}  // namespace

int gemm_t_bf16_amx(const uint16_t* x, int64_t T, int64_t N, const uint8_t* w, int64_t rb, int qtype,
                    int64_t K, float* y) {
    // A task is (group of GS slices, part): its x chunk is copied once (x is [T][N], 134 MB at
    // the real vocabulary, so reading it once per group instead of once per slice is what keeps
    // this off the memory bus) and multiplied by each slice of the group.
    const int64_t slices = (K + KS - 1) / KS, groups = (slices + GS - 1) / GS, tasks = groups * PARTS;
    const int64_t per_part = (N + PARTS - 1) / PARTS, Tp = (T + 15) / 16 * 16, xblocks = Tp / 16;
    std::vector<float> part((size_t)(PARTS * T * K));
#pragma omp parallel if (tasks > 1)
    {
        configure_tiles();
        Buffer acc((size_t)(GS * Tp * KS) * 4), wv((size_t)(NC / 2 * KS) * 4);
        Buffer xa((size_t)(Tp * NC) * 2);   // the chunk's columns of x, [Tp][NC], zero-padded
        uint16_t* xc = (uint16_t*)xa.p;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t g = task / PARTS, p = task % PARTS;
            const int64_t s_lo = g * GS, s_hi = std::min(slices, s_lo + GS);
            const int64_t n_lo = std::min(N, p * per_part), n_hi = std::min(N, n_lo + per_part);
            memset(acc.p, 0, (size_t)(GS * Tp * KS) * 4);
            for (int64_t n0 = n_lo; n0 < n_hi; n0 += NC) {
                const int64_t nn = std::min(NC, n_hi - n0);
                if (nn < NC || T < Tp) memset(xc, 0, (size_t)(Tp * NC) * 2);
                for (int64_t t = 0; t < T; ++t) memcpy(xc + t * NC, x + t * N + n0, (size_t)nn * 2);
                for (int64_t s = s_lo; s < s_hi; ++s) {
                    const int64_t k0 = s * KS, ks = std::min(KS, K - k0);
                    decode_pairs(qtype, w, rb, n0, n_hi, NC, k0, ks, KS, (uint32_t*)wv.p);
                    float* A = (float*)acc.p + (s - s_lo) * Tp * KS;
                    for (int64_t j = 0; j < KS; j += 32) {
                        int64_t b = 0;
                        for (; b + 2 <= xblocks; b += 2)
                            chunk_tiles<2>(xc + b * 16 * NC, xc + (b + 1) * 16 * NC, (const uint32_t*)wv.p,
                                           A + b * 16 * KS, A + (b + 1) * 16 * KS, j);
                        if (b < xblocks)
                            chunk_tiles<1>(xc + b * 16 * NC, nullptr, (const uint32_t*)wv.p, A + b * 16 * KS,
                                           nullptr, j);
                    }
                }
            }
            float* dst = part.data() + p * T * K;
            for (int64_t s = s_lo; s < s_hi; ++s) {
                const int64_t k0 = s * KS, ks = std::min(KS, K - k0);
                const float* A = (const float*)acc.p + (s - s_lo) * Tp * KS;
                for (int64_t t = 0; t < T; ++t) memcpy(dst + t * K + k0, A + t * KS, (size_t)ks * 4);
            }
        }
        _tile_release();
    }
    add_parts(part.data(), PARTS, T * K, y);
    return DN_OK;
}

#else   // no AMX in this build

bool amx_available() { return false; }
bool amx_active() { return false; }
void amx_enable(bool) {}
int gemm_bf16_amx(const uint16_t*, int64_t, int64_t, const uint8_t*, int64_t, int, int64_t, float*) {
    return DN_E_QTYPE;
}
int gemm_t_bf16_amx(const uint16_t*, int64_t, int64_t, const uint8_t*, int64_t, int, int64_t, float*) {
    return DN_E_QTYPE;
}

#endif

}  // namespace dn

DN_API int dn_amx(void) { return dn::amx_active(); }

DN_API int dn_amx_available(void) { return dn::amx_available(); }

DN_API void dn_set_amx(int on) { dn::amx_enable(on != 0); }
