// The tiled quantized matmul shared by dn_qmatmul and dn_moe (see gemm.cpp).
#pragma once

#include <stdint.h>

namespace dn {

// y[T, N] = x[T, K] @ W[N, K]^T with W in ggml blocks of `qtype`; returns a DN_E_* code.
int gemm(const float* x, int64_t T, int64_t K, const uint8_t* w, int qtype, int64_t N, float* y);

// The same with x in bf16 (raw bits) and products of bf16-rounded operands (fp32 accumulation)
// where the build has AVX512-BF16; elsewhere x is widened and the fp32 kernel runs.
int gemm_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* w, int qtype, int64_t N, float* y);

// y[i] = part[0][i] + part[1][i] + ... (n values per part, added in part order, so a split of a
// reduction into fixed parts gives the same sums on any number of threads).
void add_parts(const float* part, int64_t parts, int64_t n, float* y);

// Bytes of one weight row of K values (-1 when K is not a whole number of blocks).
int64_t row_bytes(int qtype, int64_t K);

}  // namespace dn
