// Head-wise compaction: every (layer, KV head) gathers the K and V rows of the cells it keeps into the sequence's
// first cells, as one ggml graph on the backends that hold the cache.
//
// Why this is exact: K is stored with RoPE already applied at the token's own position, and the causal mask only
// compares a cell's position with the query's. The destination cells keep positions below the observation window,
// so every query from the window on attends to all of them, and each head sees exactly the K/V rows it chose.
#include "kv-evict-state.h"
#include "kv-evict-graph.h"

#include "llama-context.h"
#include "llama-kv-cache.h"

namespace kv_evict {

namespace {

// rows of head g of a cache tensor stored per cell: [hd, kv_size], row stride one cell
ggml_tensor * head_rows(ggml_context * ctx, ggml_tensor * cache, uint32_t stream, int64_t hd, int64_t g) {
    return ggml_view_2d(ctx, cache, hd, cache->ne[1], cache->nb[1], stream * cache->nb[2] + g * ggml_row_size(cache->type, hd));
}

// get_rows/set_rows go through f32, which is exact for the float cache types and only for those
bool float_type(ggml_type t) {
    return t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16;
}

} // namespace

std::string head_granularity_unsupported(llama_kv_cache & kv) {
    if (!float_type(kv.type_k()) || !float_type(kv.type_v())) {
        return std::string("head granularity needs an f32, f16 or bf16 K/V cache for now (got K ") +
               ggml_type_name(kv.type_k()) + ", V " + ggml_type_name(kv.type_v()) + "): use granularity token with quantized caches";
    }
    return "";
}

int32_t compact_heads(llama_kv_evict_state & st, uint32_t stream, const std::vector<uint32_t> & dst,
        const std::vector<std::vector<uint32_t>> & src) {
    const llama_hparams & hparams = st.lctx->get_model().hparams;
    const auto layer_ids = st.kv->get_layer_ids();
    const int64_t n_kv = hparams.n_head_kv(layer_ids[0]);
    const int64_t n    = dst.size();

    const int32_t graph_size = 16 * (int32_t) (layer_ids.size() * n_kv) + 256;
    if (int32_t err = ensure_sched(st, graph_size)) {
        return err;
    }
    evict_graph g(graph_size);
    ggml_context * ctx = g.ctx.get();

    std::vector<int64_t> dst64(dst.begin(), dst.end());
    ggml_tensor * dst_idx = g.input(GGML_TYPE_I64, n, 1, dst64);

    for (size_t l = 0; l < layer_ids.size(); ++l) {
        const int32_t il = layer_ids[l];
        ggml_tensor * k = st.kv->get_k_storage(il);
        ggml_tensor * v = st.kv->get_v_storage(il);
        for (int64_t h = 0; h < n_kv; ++h) {
            std::vector<int32_t> s(src[l * n_kv + h].begin(), src[l * n_kv + h].end());
            ggml_tensor * src_idx = g.input(GGML_TYPE_I32, n, 1, s);

            ggml_tensor * kh = head_rows(ctx, k, stream, hparams.n_embd_head_k(il), h);
            ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, kh, ggml_get_rows(ctx, kh, src_idx), dst_idx));

            const int64_t hd_v = hparams.n_embd_head_v(il);
            if (!st.kv->get_v_trans()) {
                ggml_tensor * vh = head_rows(ctx, v, stream, hd_v, h);
                ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, vh, ggml_get_rows(ctx, vh, src_idx), dst_idx));
            } else {
                // transposed V: the head's dims are hd_v rows of kv_size cells; permute its columns through a copy
                const int64_t kv_size = v->ne[1];
                const size_t  row     = ggml_row_size(v->type, kv_size);
                ggml_tensor * slab = ggml_view_2d(ctx, v, kv_size, hd_v, row, stream * v->nb[2] + h * hd_v * row);
                ggml_tensor * cells = ggml_cont(ctx, ggml_transpose(ctx, slab));                     // [hd_v, kv_size]
                cells = ggml_set_rows(ctx, cells, ggml_get_rows(ctx, cells, src_idx), dst_idx);
                ggml_build_forward_expand(g.gf, ggml_cpy(ctx, ggml_transpose(ctx, cells), slab));
            }
        }
    }
    if (!g.compute(st)) {
        return set_error(ERR_COMPUTE, "compaction graph failed to allocate or compute");
    }
    return 0;
}

} // namespace kv_evict
