// Fused scoring kernels, one file per backend (native/cpu/ ...), and what picks them.
#pragma once

#include "ggml.h"
#include "ggml-backend.h"

#include <string>

namespace kv_evict {

// Which kernel computed the projected-value norms (llama_kv_evict_stats.value_norm_kernel)
enum value_norm_kernel : int32_t {
    VALUE_NORM_NONE       = 0, // not computed yet
    VALUE_NORM_GGML_GRAPH = 1, // plain ggml ops on any backend (W_O dequantised through a product with the identity)
    VALUE_NORM_FUSED_CPU  = 2,
    VALUE_NORM_FUSED_CUDA = 3,
};

// CPU: whether W_O (and its per-output scale wo_s, may be NULL) lie in host memory in ggml's row layout
bool value_norm_cpu_supports(const ggml_tensor * wo, const ggml_tensor * wo_s);

// CPU: [m, n_head] f32 norms |V_i W_O^h|_1 of the cells whose V rows (f32, [n_head_kv * head_dim, m]) are v
ggml_tensor * value_norm_cpu_op(ggml_context * ctx, ggml_tensor * v, ggml_tensor * wo, ggml_tensor * wo_s, int64_t n_head);

// CUDA (built with GGML_CUDA): whether W_O and the V cache lie in one CUDA device's memory (not split across devices)
inline bool value_norm_cuda_supports(const ggml_tensor * wo, const ggml_tensor * v_cache) {
#ifdef PYLLMKV_CUDA
    auto on_cuda = [](const ggml_tensor * t) {
        if (!t->buffer || ggml_backend_buffer_is_host(t->buffer)) {
            return false;
        }
        const std::string name = ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer));
        return name.rfind("CUDA", 0) == 0 && name.find("Split") == std::string::npos;
    };
    return on_cuda(wo) && on_cuda(v_cache) && ggml_backend_buffer_get_type(wo->buffer) == ggml_backend_buffer_get_type(v_cache->buffer);
#else
    (void) wo;
    (void) v_cache;
    return false;
#endif
}

} // namespace kv_evict
