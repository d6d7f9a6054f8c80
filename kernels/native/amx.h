// The AMX (tile) bf16 matmuls, see amx.cpp. Every function exists in every build; without AMX in
// the build (or on the CPU, or without the kernel's permission) amx_active() is false and the
// callers keep their AVX512-BF16 / fp32 kernels.
#pragma once

#include <stdint.h>

namespace dn {

// The CPU has AMX-BF16 and Linux granted this process the tile state (probed once).
bool amx_available();
// amx_available() and not switched off by amx_enable(false) (dn_set_amx).
bool amx_active();
void amx_enable(bool on);

// y[T, N] = x[T, K] @ W[N, K]^T, x bf16 bits, W rows of `rb` bytes in ggml blocks of `qtype`
// (arguments already checked by the caller). Call only when amx_active().
int gemm_bf16_amx(const uint16_t* x, int64_t T, int64_t K, const uint8_t* w, int64_t rb, int qtype,
                  int64_t N, float* y);
// y[T, K] = x[T, N] @ W[N, K], the same operands (the self-conditioning product).
int gemm_t_bf16_amx(const uint16_t* x, int64_t T, int64_t N, const uint8_t* w, int64_t rb, int qtype,
                    int64_t K, float* y);

}  // namespace dn
