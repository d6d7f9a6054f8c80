// Small entry points of the C ABI: version, threads, block sizes, plain dequantization.
#include <algorithm>

#include "blocks.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

DN_API int dn_abi_version(void) { return DN_ABI_VERSION; }

DN_API const char* dn_simd(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#elif defined(__ARM_NEON)
    return "neon";
#else
    return "scalar";
#endif
}

DN_API void dn_set_threads(int n) {
#if defined(_OPENMP)
    omp_set_num_threads(std::max(n, 1));
#else
    (void)n;
#endif
}

DN_API int dn_get_threads(void) {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

DN_API int dn_block_info(int qtype, int64_t* block_elems, int64_t* block_bytes) {
    const dn::BlockInfo b = dn::block_info(qtype);
    *block_elems = b.elems;
    *block_bytes = b.bytes;
    return b.elems ? DN_OK : DN_E_QTYPE;
}

DN_API int dn_dequantize(const uint8_t* raw, int qtype, int64_t n, float* out) {
    const dn::BlockInfo b = dn::block_info(qtype);
    if (b.elems == 0) return DN_E_QTYPE;
    if (n < 0 || n % b.elems != 0) return DN_E_SHAPE;
    // Chunks of whole blocks so every chunk starts on a block boundary.
    const int64_t chunk = b.elems * std::max<int64_t>(1, 16384 / b.elems);
    const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t k0 = c * chunk;
        dn::dequant_range(qtype, raw, k0, std::min(chunk, n - k0), out + k0);
    }
    return DN_OK;
}
