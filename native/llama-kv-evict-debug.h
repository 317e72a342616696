// Debug and test entry points of pyllmkv's eviction hook, kept out of llama.h: what each head holds, the cache's rows,
// the captured queries, AdaKV's allocation alone. Exported from libllama like the public API (pyllmkv's tests and
// scripts bind them with ctypes).
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

    // Debug: the position of the token whose row each KV head holds (the position RoPE gave its K), for layer il and
    // the cells of seq_id in position order: out[g*m + i], m = min(n, n_max); -1 where an -ada head holds no token.
    // Equals the cells' positions unless head granularity moved or renumbered rows. Returns n or a negative error code
    LLAMA_API int32_t llama_kv_evict_head_positions(struct llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_pos * out, int32_t n_max);

    // Debug: the bytes of layer il's K (is_v false) or V cache rows for the cells of seq_id in position order, each
    // row n_embd_gqa elements in the cache's type (a transposed V cache is read back untransposed).
    // Returns the bytes needed (nothing is written if size is smaller), or a negative error code
    LLAMA_API int64_t llama_kv_evict_read_rows(struct llama_context * ctx, llama_seq_id seq_id, int32_t il, bool is_v, void * out, size_t size);

    // Debug: the queries of layer il that scored the last eviction or will score the next one (the observation window,
    // after RoPE, as build_attn passed them), for the captured positions of seq_id in ascending order, i < min(n, n_max):
    // pos[i] and q[i*n_embd_q + j]; *n_embd_q gets n_head * head_dim, *kq_scale the layer's softmax scale.
    // Any output may be NULL. Returns n (at most the window), or a negative error code
    LLAMA_API int32_t llama_kv_evict_queries(struct llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_pos * pos,
            float * q, int32_t n_max, int32_t * n_embd_q, float * kq_scale);

    // Debug: where the evictions of seq_id spent their time (t_evict_us of llama_kv_evict_stats), summed over them in
    // microseconds: t_us[0] waiting for the decode still running, [1] projected-value norms of the new cells, [2] the
    // rest of scoring (window attention, pooling), [3] choosing the kept cells on the host, [4] moving kept rows and
    // removing the rest. Writes min(n, 5) values. Returns 5, or a negative error code
    LLAMA_API int32_t llama_kv_evict_profile(struct llama_context * ctx, llama_seq_id seq_id, int64_t * t_us, int32_t n);

    // AdaKV's allocation as the -ada policies compute it, for tests and analysis: how many of n cells each of n_head
    // heads keeps (share[h]) given scores[h*n + i], a pool of n_head * budget, safeguard alpha and a per-head cap.
    // Returns 0 or a negative error code
    LLAMA_API int32_t llama_kv_evict_adakv_shares(const float * scores, int32_t n_head, int32_t n, int32_t budget, float alpha, int32_t cap, int32_t * share);

#ifdef __cplusplus
}
#endif
