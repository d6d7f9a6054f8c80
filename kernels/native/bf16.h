// Weight rows decoded straight to bf16 with AVX-512 (bf16.cpp), for the bf16 matmuls: the
// AVX512-BF16 kernels in gemm.cpp / gemm_t.cpp and the AMX tile kernels in amx.cpp.
//
// Every value is blocks.h's fp32 dequantization rounded to bf16 (nearest even), computed in
// registers without the fp32 round trip through memory. A "pair" is two bf16 values adjacent along
// a reduction packed in 32 bits (low half first), the operand layout of vdpbf16ps and TDPBF16PS.
//
// DN_AVX512BF16 is 1 where the build has the instructions (AVX512F, BW, VL and BF16: every CPU with
// AVX512-BF16 has the other three); the functions exist only then.
#pragma once

#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DN_AVX512BF16 1
#else
#define DN_AVX512BF16 0
#endif

#if DN_AVX512BF16
namespace dn {

// n fp32 values (n a multiple of 16) -> n bf16 bits, rounded to nearest even.
void to_bf16(const float* src, int64_t n, uint16_t* dst);

// Values [k0, k0 + n) of one weight row as bf16 at dst, zeros from n up to `width` (n > 0; k0
// and n whole blocks for block types; dst has room for max(width, n rounded up to 16) values).
void decode_span(int qtype, const uint8_t* row, int64_t k0, int64_t n, int64_t width, uint16_t* dst);

// Weight rows [n0, n0 + rows) (rows even; zeros from n_hi on), columns [k0, k0 + ks), as
// rows / 2 lines of `width` pairs at wv: line i, lane j holds (W[n0 + 2i][k0 + j],
// W[n0 + 2i + 1][k0 + j]), zeros from ks up to width (a multiple of 32, at most 256).
void decode_pairs(int qtype, const uint8_t* w, int64_t rb, int64_t n0, int64_t n_hi, int64_t rows,
                  int64_t k0, int64_t ks, int64_t width, uint32_t* wv);

}  // namespace dn
#endif
