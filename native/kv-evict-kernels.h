// Fused scoring kernels, one file per backend (native/cpu/ ...), and what picks them.
#pragma once

#include "ggml.h"
#include "ggml-backend.h"

#include <string>
#include <vector>

namespace kv_evict {

// Which kernel computed the projected-value norms and the window attention, or moved a transposed V cache's rows
// (llama_kv_evict_stats.value_norm_kernel, .window_attn_kernel, .compact_kernel)
enum scoring_kernel : int32_t {
    KERNEL_NONE       = 0, // not computed yet
    KERNEL_GGML_GRAPH = 1, // plain ggml ops on any backend
    KERNEL_FUSED_CPU  = 2,
    KERNEL_FUSED_CUDA = 3,
    KERNEL_FUSED_CPU_INT8 = 4, // the CPU kernel's int8 product (value norms of quantised W_O, AVX-512 VNNI)
};

// CPU: whether W_O (and its per-output scale wo_s, may be NULL) lie in host memory in ggml's row layout
bool value_norm_cpu_supports(const ggml_tensor * wo, const ggml_tensor * wo_s);

// CPU: whether this build computes the norms of a layer with this W_O in int8 (quantised W_O, AVX-512 VNNI)
bool value_norm_cpu_int8(const ggml_tensor * wo, int64_t n_head);

// CPU: [m, n_head] f32 norms |V_i W_O^h|_1 of the cells whose V rows (f32, [n_head_kv * head_dim, m]) are v; in int8
// where value_norm_cpu_int8 allows
ggml_tensor * value_norm_cpu_op(ggml_context * ctx, ggml_tensor * v, ggml_tensor * wo, ggml_tensor * wo_s, int64_t n_head,
        bool int8);

// CPU: whether the K cache and the query ring lie in host memory and K's type can be dequantised per head
bool window_attn_cpu_supports(const ggml_tensor * k_cache, const ggml_tensor * ring, int64_t head_dim);

// What the fused window attention reads beside its tensors; must live until the graph ran
struct window_attn_args {
    float   kq_scale    = 1.0f;
    bool    pooled_max  = false; // also DefensiveKV's maximum over the queries (below)
    int64_t n_prefix    = 0;     // cells scored for it: the first n_prefix
    int32_t pool_kernel = 1;
};

// CPU: [n, n_head, 1] f32: per query head, the window queries' softmax attention over the cells cell_idx (i32 [n]) of
// the stream's K rows k ([n_kv*hd, kv_size], cache type), masked by kq_mask ([n, n_q]) and head_mask ([n, n_head], may
// be NULL), summed with the weights ([n_q]); q is [n_head*hd, n_q] f32. With args->pooled_max, [n, n_head, 2]: plane
// 1 holds, per head and prefix cell, the maximum over the queries of weight > 0 of each query's prefix row pooled over
// pool_kernel cells and rescaled to the row's prefix mass (0 past the prefix)
ggml_tensor * window_attn_cpu_op(ggml_context * ctx, ggml_tensor * k, ggml_tensor * q, ggml_tensor * cell_idx,
        ggml_tensor * kq_mask, ggml_tensor * weight, ggml_tensor * head_mask, int64_t n_head, window_attn_args * args);

// CPU: whether V, stored transposed (a row of kv_size cells per dimension), lies in host memory in a type that
// compaction moves as whole elements
bool compact_v_trans_cpu_supports(const ggml_tensor * v);

// What the transposed-V compaction reads beside its tensor; must live until the graph ran
struct compact_v_args {
    uint32_t stream    = 0;
    int64_t  n_head_kv = 0;
    int64_t  head_dim  = 0;
    const std::vector<int64_t>  * dst = nullptr; // the cells a head's kept rows fill, in order
    const std::vector<uint32_t> * src = nullptr; // [n_head_kv]: per KV head of the layer, the cells of its kept rows
};

// CPU: moves, in the transposed V cache v of one layer ([n_embd_v, kv_size, n_stream] as stored), each head's cells
// src[h][j] to dst[j] along every one of its dimension rows, in place. Returns a 1-element tensor to expand the graph with
ggml_tensor * compact_v_trans_cpu_op(ggml_context * ctx, ggml_tensor * v, compact_v_args * args);

// CUDA (built with GGML_CUDA): whether tensors a and b (W_O and the V cache, the K cache and the query ring) lie in one
// CUDA device's memory (not split across devices)
inline bool cuda_supports(const ggml_tensor * a, const ggml_tensor * b) {
#ifdef PYLLMKV_CUDA
    auto on_cuda = [](const ggml_tensor * t) {
        if (!t->buffer || ggml_backend_buffer_is_host(t->buffer)) {
            return false;
        }
        const std::string name = ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer));
        return name.rfind("CUDA", 0) == 0 && name.find("Split") == std::string::npos;
    };
    return on_cuda(a) && on_cuda(b) && ggml_backend_buffer_get_type(a->buffer) == ggml_backend_buffer_get_type(b->buffer);
#else
    (void) a;
    (void) b;
    return false;
#endif
}

} // namespace kv_evict
