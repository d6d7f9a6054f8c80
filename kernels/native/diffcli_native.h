// C ABI of the diffcli native CPU kernels (loaded from Python with ctypes, see diffcli/compute/native.py).
//
// Weights stay in their ggml blocks; a matmul dequantizes one tile of weight rows at a time into a
// small fp32 scratch and reuses it for every activation row. Legend: T activation rows, K
// in-features (elements per weight row), N out-features (weight rows), E experts, F expert width,
// A active experts per token.
//
// Every entry point returns 0 on success and a negative DN_E_* code on bad arguments, so a wrong
// call from Python becomes an exception instead of a crash.
#pragma once

#include <stdint.h>

#if defined(_WIN32)
#define DN_API extern "C" __declspec(dllexport)
#else
#define DN_API extern "C" __attribute__((visibility("default")))
#endif

// Bumped whenever a signature below changes; native.py refuses a library with another value.
#define DN_ABI_VERSION 9

// ggml type ids (the numbers in a GGUF tensor info).
enum dn_qtype {
    DN_F32 = 0,
    DN_F16 = 1,
    DN_Q5_0 = 6,
    DN_Q8_0 = 8,
    DN_Q4_K = 12,
    DN_Q6_K = 14,
    DN_BF16 = 30,
};

enum dn_error {
    DN_OK = 0,
    DN_E_QTYPE = -1,      // type not implemented
    DN_E_SHAPE = -2,      // K not a multiple of the block size, or a negative size
    DN_E_EXPERT = -3,     // an expert id outside [0, E)
};

DN_API int dn_abi_version(void);
// SIMD path of the matmul kernel compiled in: "avx512", "avx2", "neon" (the portable kernel,
// vectorized by the compiler) or "scalar".
DN_API const char* dn_simd(void);
DN_API void dn_set_threads(int n);
DN_API int dn_get_threads(void);

// Elements per block and bytes per block of a type (0, 0 when unsupported).
DN_API int dn_block_info(int qtype, int64_t* block_elems, int64_t* block_bytes);

// out[0..n) = the n values stored in `raw` (n a multiple of the block size).
DN_API int dn_dequantize(const uint8_t* raw, int qtype, int64_t n, float* out);

// y[T, N] = x[T, K] @ W[N, K]^T, W given as N rows of ggml blocks.
DN_API int dn_qmatmul(const float* x, int64_t T, int64_t K, const uint8_t* w, int qtype,
                      int64_t N, float* y);

// Routed experts: out[t] = sum_a weights[t,a] * down_e(gelu_tanh(gate_e(x_t)) * up_e(x_t)), e = ids[t,a].
// gate_up [E, 2F, K] (rows 0..F-1 gate, F..2F-1 up), down [E, K, F]; out [T, K] is overwritten.
DN_API int dn_moe(const float* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
                  const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
                  const float* weights, int64_t A, float* out);

// bf16 activations (raw bits), fp32 results. With dn_has_bf16() the products are of bf16-rounded
// operands (the weights are decoded, then rounded to bf16) accumulated in fp32 (AVX512-BF16 or
// AMX), in dn_qmatmul_bf16, dn_moe_bf16 and dn_qmatmul_t_bf16 alike; without it x is widened and
// the fp32 kernels run. K must be even.
DN_API int dn_has_bf16(void);
// AMX: dn_amx_available() is 1 when the CPU has AMX-BF16 and Linux granted the tile state;
// dn_amx() is 1 when the bf16 matmuls (qmatmul, moe, qmatmul_t) run on the tiles, which
// dn_set_amx(0) switches off (and dn_set_amx(1) back on) for this process: the same products of
// bf16 operands with fp32 sums as the AVX512-BF16 kernels, in another order.
DN_API int dn_amx_available(void);
DN_API int dn_amx(void);
DN_API void dn_set_amx(int on);
DN_API int dn_qmatmul_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* w, int qtype,
                           int64_t N, float* y);
DN_API int dn_moe_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
                       const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
                       const float* weights, int64_t A, float* out);

// out[c] = torch.multinomial(probs, 1, generator)[c] for probs [C, V] (rows need not sum to 1),
// drawing from and advancing the CPU generator whose Generator.get_state() bytes are given.
DN_API int dn_sample(const float* probs, int64_t C, int64_t V, uint8_t* torch_state, int64_t* out);

// The vocabulary side of one step (bf16 mode), per row c of logits [C, V] (fp32, or bf16 bits):
// t = cap * tanh(l / cap) / temperature (no softcap when cap <= 0); argmax[c] (first maximum of
// t), lse[c] = logsumexp(t), entropy[c] = -sum p log p with p = softmax(t), and probs[c] = p as
// bf16 bits. probs may be the same memory as bf16 logits. temperature must be > 0.
DN_API int dn_vocab(const float* logits, int64_t C, int64_t V, float cap, float temperature,
                    uint16_t* probs, int64_t* argmax, float* lse, float* entropy);
DN_API int dn_vocab_from_bf16(const uint16_t* logits, int64_t C, int64_t V, float cap, float temperature,
                              uint16_t* probs, int64_t* argmax, float* lse, float* entropy);
// x[0..n) = cap * tanh(x / cap) in place (nothing when cap <= 0), by the exp-based formula of
// dn_vocab's softcap (within a few fp32 ulps of cap of torch.tanh): the logits of an unfused step.
DN_API int dn_softcap(float* x, int64_t n, float cap);
// out[c] = the first v with sum(probs[c, :v+1]) > u[c] * sum(probs[c, :]) (bf16 probs, any scale;
// u in [0, 1)): one draw per row by the inverse CDF.
DN_API int dn_draw_bf16(const uint16_t* probs, int64_t C, int64_t V, const double* u, int64_t* out);

// y[T, K] = x[T, N] @ W[N, K], W given as N rows of ggml blocks (the transpose of dn_qmatmul's
// use): softmax(logits) @ E from the embedding's blocks. fp32 accumulation; x fp32 or bf16 bits
// (bf16 x meets W rounded to bf16 where dn_has_bf16()).
DN_API int dn_qmatmul_t(const float* x, int64_t T, int64_t N, const uint8_t* w, int qtype, int64_t K,
                        float* y);
DN_API int dn_qmatmul_t_bf16(const uint16_t* x, int64_t T, int64_t N, const uint8_t* w, int qtype,
                             int64_t K, float* y);
// out [K, N] = W^T in Q8_0 blocks (34 bytes per 32 values along N; N a multiple of 32) from W
// [N, K] of any type dn_dequantize takes, rounded as gguf.quants' Q8_0 (byte for byte): the int8
// kernels' operand for x @ W with W's rows as the reduction (self-conditioning's probs @ E).
DN_API int dn_transpose_q8_0(const uint8_t* w, int qtype, int64_t N, int64_t K, uint8_t* out);

// Int8 products on the quantized blocks (q8.cpp), for weights of Q4_K, Q5_0, Q6_K or Q8_0
// (dn_q8_supports; DN_E_QTYPE for the others): x is rounded to int8 per row and group of 32
// values, xq = round-half-even(x * 127 / max|x|) with dx = max|x| / 127 (as llama.cpp's Q8_0),
// and meets the weights' quants as integers (exact int32 dot products per group, or per half of
// 16 for Q6_K, whose scales are per 16), the scales applied in fp32. AVX512-VNNI (vpdpbusd) where
// dn_has_vnni(), portable loops elsewhere.
// K (and F for dn_moe_q8) are multiples of 32, as these types' rows are. dn_moe_q8 rounds x once
// per token and gelu(gate) * up once per (expert, token) from fp32; the rest as dn_moe.
DN_API int dn_has_vnni(void);
DN_API int dn_q8_supports(int qtype);
// The rounding the kernels apply for weights of type qtype: xq [T, K] int8, dx [T, K / 32] fp32,
// and for Q4_K sx = dx * sum(xq) per group [T, K / 32] fp32 (zx untouched), for the others
// zx = -o * sum(xq) [T, K / 16 (Q6_K) or K / 32] int32 (sx untouched), o = 16 (Q5_0), 128 (Q8_0),
// 32 (Q6_K): their offset in whole scales, which the integer dot products start from.
DN_API int dn_quantize_q8(const float* x, int64_t T, int64_t K, int qtype, int8_t* xq, float* dx, float* sx,
                          int32_t* zx);
DN_API int dn_qmatmul_q8(const float* x, int64_t T, int64_t K, const uint8_t* w, int qtype, int64_t N,
                         float* y);
DN_API int dn_qmatmul_q8_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* w, int qtype,
                              int64_t N, float* y);
DN_API int dn_moe_q8(const float* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
                     const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
                     const float* weights, int64_t A, float* out);
DN_API int dn_moe_q8_bf16(const uint16_t* x, int64_t T, int64_t K, const uint8_t* gate_up, int gu_qtype,
                          const uint8_t* down, int down_qtype, int64_t E, int64_t F, const int64_t* ids,
                          const float* weights, int64_t A, float* out);

// RMSNorm with its neighbours fused (norm.cpp), on rows of D values, all activations of one dtype
// (bf16 bits where bf16, else fp32), w (D fp32 values) or null for no weight. Each step rounds
// to that dtype where torch's composition of the same ops does:
//   dn_rms_norm: s = x (+ x2), y = s / sqrt(mean(s^2) + eps) (* w), out = y (+ add) (* scale);
//     x2 and add may be null; out may be x, x2 or add.
//   dn_rms_rope: rows are T tokens of `heads` heads, y as above (no x2), then
//     out = y * cos + rotate_half(y) * sin in fp32 with cos, sin [T, D] fp32 (rotate_half(y) =
//     (-y[D/2:], y[:D/2])); out may be x.
DN_API int dn_rms_norm(const void* x, const void* x2, int64_t R, int64_t D, int bf16, const float* w,
                       float eps, const void* add, float scale, void* out);
DN_API int dn_rms_rope(const void* x, int64_t T, int64_t heads, int64_t D, int bf16, const float* w,
                       float eps, const float* cos_t, const float* sin_t, void* out);
// dn_norm_portable(1): the two calls above take their portable row loops even in an AVX-512
// build (the tests run both); (0) back to the default.
DN_API void dn_norm_portable(int on);
// dst[0..n) = src[0..n) as bf16 bits, rounded as torch's .to(torch.bfloat16) (nearest even).
DN_API int dn_to_bf16(const float* src, int64_t n, uint16_t* dst);
// x[0..n) rounded to bf16 in place, kept as fp32 (x.to(torch.bfloat16).float() without the copies).
DN_API int dn_round_bf16(float* x, int64_t n);
