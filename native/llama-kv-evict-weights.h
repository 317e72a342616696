// How pyllmkv loads a CPU model's weights, kept out of llama.h: exported from libllama like the public API (pyllmkv
// binds it with ctypes and passes it to llama.cpp's loader as a tensor buffer-type override).
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

    // The CPU buffer type under an identity of its own. llama.cpp repacks the weights of a CPU model for its matmul
    // (CPU_REPACK), also those overridden to the CPU buffer type itself; a weight overridden to this one stays in
    // ggml's row layout, which the fused CPU kernels read (W_O, for the value norms)
    LLAMA_API ggml_backend_buffer_type_t llama_kv_evict_plain_cpu_buffer_type(void);

#ifdef __cplusplus
}
#endif
