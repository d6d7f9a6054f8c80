// Int8 products on the quantized blocks (q8.cpp): the activations quantized per row and group of
// Q8_GROUP values, the weights' quants used as integers.
#pragma once

#include <stdint.h>

// AVX512-VNNI (vpdpbusd) kernels where the build has the instructions
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define DN_VNNI 1
#else
#define DN_VNNI 0
#endif

namespace dn {

constexpr int Q8_GROUP = 32;

// The weight types the int8 kernels take: Q4_K, Q5_0, Q6_K, Q8_0.
bool q8_type(int qtype);

// The values per weight scale of a q8_type: 16 for Q6_K, else 32.
int q8_sub(int qtype);

// The offset of a q8_type in whole scales (w = dl * (u - o)): Q5_0 16, Q8_0 128, Q6_K 32; 0 for
// Q4_K, whose offset dmin * m is a float of its own.
int q8_offset(int qtype);

// Rows of x [T, K] (K a multiple of Q8_GROUP) rounded for the kernel of weight type qtype:
// xq [T, K] int8 and, per group g of a row, dx = max|x| / 127 [T, K / Q8_GROUP], x ~ dx * xq;
// then for Q4_K the float sx = dx * sum(xq) per group (q8_float_sums per row), for the others
// the int32 zx = -q8_offset * sum(xq) per q8_sub values (q8_int_sums per row), where the
// integer dot products start. The other pointer is not touched (it may be null).
int64_t q8_float_sums(int qtype, int64_t K);
int64_t q8_int_sums(int qtype, int64_t K);
void quantize_rows(const float* x, int64_t T, int64_t K, int qtype, int8_t* xq, float* dx, float* sx,
                   int32_t* zx);
void quantize_rows(const uint16_t* x, int64_t T, int64_t K, int qtype, int8_t* xq, float* dx, float* sx,
                   int32_t* zx);

// y[T, N] = (dx * xq)[T, K] @ W[N, K]^T, W in blocks of a q8_type and x rounded for it by
// quantize_rows; a DN_E_* code.
int gemm_q8(const int8_t* xq, const float* dx, const float* sx, const int32_t* zx, int64_t T, int64_t K,
            const uint8_t* w, int qtype, int64_t N, float* y);

}  // namespace dn
