// Int8 products on the quantized blocks (q8.cpp): the activations quantized per row and group of
// Q8_GROUP values, the weights' quants used as integers.
#pragma once

#include <stdint.h>

namespace dn {

constexpr int Q8_GROUP = 32;

// The weight types the int8 kernels take: Q4_K, Q5_0, Q8_0.
bool q8_type(int qtype);

// Rows of x [T, K] (K a multiple of Q8_GROUP) -> xq [T, K] int8 and, per group g of a row,
// dx = max|x| / 127 and sx = dx * sum(xq) [T, K / Q8_GROUP]: x ~ dx * xq.
void quantize_rows(const float* x, int64_t T, int64_t K, int8_t* xq, float* dx, float* sx);
void quantize_rows(const uint16_t* x, int64_t T, int64_t K, int8_t* xq, float* dx, float* sx);

// y[T, N] = (dx * xq)[T, K] @ W[N, K]^T, W in blocks of a q8_type; a DN_E_* code.
int gemm_q8(const int8_t* xq, const float* dx, const float* sx, int64_t T, int64_t K, const uint8_t* w,
            int qtype, int64_t N, float* y);

}  // namespace dn
