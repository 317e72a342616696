// The plain CPU buffer type (llama-kv-evict-weights.h): the CPU buffer type's functions, so that its buffers are host
// memory the CPU backend computes on, under another address, which llama.cpp's loader does not take for the CPU's.
#include "llama-kv-evict-weights.h"

#include "ggml-backend-impl.h"
#include "ggml-cpu.h"

ggml_backend_buffer_type_t llama_kv_evict_plain_cpu_buffer_type(void) {
    static ggml_backend_buffer_type plain = *ggml_backend_cpu_buffer_type();
    return &plain;
}
