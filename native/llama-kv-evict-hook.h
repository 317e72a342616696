// The seam between the patched llama.cpp and pyllmkv's native code: the only symbols the patch calls.
#pragma once

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

// Called from ~llama_context. Accepts nullptr.
void llama_kv_evict_state_free(llama_kv_evict_state * st);
