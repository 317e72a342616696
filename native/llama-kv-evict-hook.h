// The seam between the patched llama.cpp and pyllmkv's native code: the only symbols the patch calls.
#pragma once

#include <cstdint>

struct ggml_context;
struct ggml_cgraph;
struct ggml_tensor;
class  llm_graph_result;
struct llama_kv_evict_state;

// Called from llm_graph_context::build_attn of the KV-cache variants, with q_cur final (after RoPE and after the
// Hadamard rotation of a quantized K cache), so that scores use the same Q·K the model uses. Adds to gf a copy of the
// last min(n_tokens, window) query rows of layer il into the layer's query ring, and returns the attention mask the
// layer uses: kq_mask itself, or with an -ada policy kq_mask plus a per-head mask of the cells where a head's AdaKV
// share holds no token.
ggml_tensor * llama_kv_evict_attn(
        llama_kv_evict_state * st,
        ggml_context         * ctx0,
        ggml_cgraph          * gf,
        llm_graph_result     * res,
        ggml_tensor          * q_cur,
        ggml_tensor          * kq_mask,
        float                  kq_scale,
        int                    il);

// Called from llama_kv_cache::seq_rm after it removed [p0, p1) of seq_id (-1: all), while eviction is enabled:
// head-wise compaction may have moved rows of the removed tokens into other cells, which then go too
void llama_kv_evict_on_seq_rm(llama_kv_evict_state * st, int32_t seq_id, int32_t p0, int32_t p1);

// Called from llama_kv_cache::seq_cp when it copies seq_id_src's cells and rows into seq_id_dst's stream, while
// eviction is enabled: the hook's bookkeeping and captured queries of the source are copied with them
void llama_kv_evict_on_seq_cp(llama_kv_evict_state * st, int32_t seq_id_src, int32_t seq_id_dst);

// Called from llama_kv_cache::state_write of seq_id (-1: all) while eviction is enabled: throws std::runtime_error
// (llama.cpp's state API then reports the error and writes nothing) if the cache relies on the hook's per-head mask,
// which llama.cpp's state leaves out, and llama_kv_evict_seq_get_data has not written it since it last changed
void llama_kv_evict_on_state_write(const llama_kv_evict_state * st, int32_t seq_id);

// Called from llama_kv_cache::state_read of seq_id (-1: all) while eviction is enabled: the cells hold other tokens
// now, so the hook's per-cell bookkeeping of those sequences starts afresh
void llama_kv_evict_on_state_read(llama_kv_evict_state * st, int32_t seq_id);

// Called from ~llama_context. Accepts nullptr.
void llama_kv_evict_state_free(llama_kv_evict_state * st);
