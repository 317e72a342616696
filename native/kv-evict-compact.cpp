// Head-wise compaction: every (layer, KV head) gathers the K and V rows of the cells it keeps into the sequence's
// first cells, as one ggml graph on the backends that hold the cache.
//
// Why this is exact: K is stored with RoPE already applied at the token's own position, and the causal mask only
// compares a cell's position with the query's. The destination cells keep positions below the observation window,
// so every query from the window on attends to all of them, and each head sees exactly the K/V rows it chose.
#include "kv-evict-state.h"
#include "kv-evict-graph.h"
#include "kv-evict-kernels.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

namespace kv_evict {

namespace {

// The rows of head g of a cache tensor stored per cell, [head bytes / 4, kv_size] seen as 32-bit words: get_rows and
// set_rows copy them bit for bit whatever the cache type (f16, bf16, q8_0, q4_0 ...), where a round trip through f32
// values would requantize. The words are moved as f32, which both ops copy without arithmetic.
ggml_tensor * head_words(ggml_context * ctx, ggml_tensor * cache, uint32_t stream, int64_t hd, int64_t g) {
    const size_t head_bytes = ggml_row_size(cache->type, hd);
    ggml_tensor * t = ggml_view_2d(ctx, cache, hd, cache->ne[1], cache->nb[1], stream * cache->nb[2] + g * head_bytes);
    t->type  = GGML_TYPE_F32;
    t->ne[0] = head_bytes / sizeof(float);
    t->nb[0] = sizeof(float);
    t->nb[2] = t->nb[3] = t->nb[1] * t->ne[1];
    return t;
}

// "" if head hd of a per-cell tensor of this type is whole blocks of whole 32-bit words, else why not
std::string head_slice_unsupported(const char * what, ggml_type type, int64_t hd) {
    if (hd % ggml_blck_size(type) != 0 || ggml_row_size(type, hd) % sizeof(float) != 0) {
        return std::string("head granularity cannot move ") + what + " rows of type " + ggml_type_name(type) +
               ": head_dim " + std::to_string(hd) + " is not a whole number of its 4-byte-aligned blocks; use granularity token (with a "
               "policy of uniform allocation, such as criticalkv)";
    }
    return "";
}

} // namespace

std::string head_granularity_unsupported(llama_kv_cache & kv, const llama_hparams & hparams) {
    for (uint32_t il : kv.get_layer_ids()) {
        std::string why = head_slice_unsupported("K", kv.type_k(), hparams.n_embd_head_k(il));
        if (why.empty() && !kv.get_v_trans()) {
            why = head_slice_unsupported("V", kv.type_v(), hparams.n_embd_head_v(il));
        }
        if (!why.empty()) {
            return why;
        }
    }
    return "";
}

int32_t compact_heads(llama_kv_evict_state & st, uint32_t stream, const std::vector<uint32_t> & dst,
        const std::vector<std::vector<uint32_t>> & src) {
    const llama_hparams & hparams = st.lctx->get_model().hparams;
    const auto layer_ids = st.kv->get_layer_ids();
    const int64_t n_kv = hparams.n_head_kv(layer_ids[0]);

    const int32_t graph_size = 16 * (int32_t) (layer_ids.size() * n_kv) + 256;
    if (int32_t err = ensure_sched(st, graph_size)) {
        return err;
    }
    evict_graph g(graph_size);
    ggml_context * ctx = g.ctx.get();

    std::vector<int64_t> dst64(dst.begin(), dst.end());
    ggml_tensor * dst_all = g.input(GGML_TYPE_I64, dst64.size(), 1, dst64);

    // a transposed V in host memory moves along its rows in place (native/cpu/compact-v.cpp); elsewhere, or with
    // LLAMA_KV_EVICT_COMPACT=graph, the graph below transposes each head's slab there and back
    const bool v_fused = st.kv->get_v_trans() && !graph_forced("LLAMA_KV_EVICT_COMPACT") &&
                         std::all_of(layer_ids.begin(), layer_ids.end(), [&](int32_t il) {
                             return compact_v_trans_cpu_supports(st.kv->get_v_storage(il)); });
    std::vector<compact_v_args> v_args(v_fused ? layer_ids.size() : 0);
    if (st.kv->get_v_trans()) {
        st.compact_kernel = v_fused ? KERNEL_FUSED_CPU : KERNEL_GGML_GRAPH;
    }

    for (size_t l = 0; l < layer_ids.size(); ++l) {
        const int32_t il = layer_ids[l];
        ggml_tensor * k = st.kv->get_k_storage(il);
        ggml_tensor * v = st.kv->get_v_storage(il);
        if (v_fused) {
            v_args[l] = {stream, n_kv, hparams.n_embd_head_v(il), &dst64, &src[l * n_kv]};
            ggml_build_forward_expand(g.gf, compact_v_trans_cpu_op(ctx, v, &v_args[l]));
        }
        for (int64_t h = 0; h < n_kv; ++h) {
            const std::vector<int32_t> s(src[l * n_kv + h].begin(), src[l * n_kv + h].end());
            const int64_t n = s.size();
            if (n == 0) {
                continue; // a head that won no cells (one top-k over a layer's or the model's pairs): nothing to move
            }
            ggml_tensor * src_idx = g.input(GGML_TYPE_I32, n, 1, s);
            ggml_tensor * dst_idx = ggml_view_1d(ctx, dst_all, n, 0); // a head's share fills the first of the cells

            ggml_tensor * kh = head_words(ctx, k, stream, hparams.n_embd_head_k(il), h);
            ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, kh, ggml_get_rows(ctx, kh, src_idx), dst_idx));

            const int64_t hd_v = hparams.n_embd_head_v(il);
            if (!st.kv->get_v_trans()) {
                ggml_tensor * vh = head_words(ctx, v, stream, hd_v, h);
                ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, vh, ggml_get_rows(ctx, vh, src_idx), dst_idx));
            } else if (!v_fused) {
                // transposed V (f32/f16/bf16 only: llama.cpp quantizes V with flash attention only, which stores it
                // per cell): the head's dims are hd_v rows of kv_size cells; permute its columns through a copy, exact
                // through f32 for these types
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

int32_t shift_rows_and_queries(llama_kv_evict_state & st, llama_seq_id seq_id, const std::vector<std::vector<int32_t>> & shift,
        llama_pos query_shift) {
    const llama_hparams & hparams = st.lctx->get_model().hparams;
    const uint32_t stream = st.kv->get_stream(seq_id);
    const kv_evict_seq & seq = st.seqs[seq_id];
    const auto layer_ids = st.kv->get_layer_ids();
    const int64_t n_kv = st.n_head_kv;

    const int32_t graph_size = 16 * (int32_t) (layer_ids.size() * n_kv + st.ring.size()) + 256;
    if (int32_t err = ensure_sched(st, graph_size)) {
        return err;
    }
    evict_graph g(graph_size);
    ggml_context * ctx = g.ctx.get();
    // with a quantized K cache llama.cpp stores K, and build_attn's Q, Hadamard-rotated
    ggml_tensor * rot = st.kv->build_input_k_rot(ctx);
    if (rot) {
        g.fillers.push_back([&st, rot]() { st.kv->set_input_k_rot(rot); });
    }
    bool any = false;
    ggml_tensor * query_pos = nullptr; // one shift for every captured query of every layer: one input serves them all
    for (size_t l = 0; l < layer_ids.size(); ++l) {
        const int32_t il = layer_ids[l];
        if (!hparams.has_rope(il)) {
            continue;
        }
        ggml_tensor * k  = st.kv->get_k_storage(il);
        const int64_t hd = hparams.n_embd_head_k(il);
        const int64_t kv_size = k->ne[1];
        // every head row of the layer as a row of its own, [hd, 1, kv_size * n_kv] (cell-major): one contiguous view,
        // which a quantized cache needs (the K-shift writes it back through a copy), with one shift per (cell, head)
        std::vector<int32_t> by(kv_size * n_kv, 0);
        bool layer_any = false;
        for (int64_t h = 0; h < n_kv; ++h) {
            const auto & sh = shift[l * n_kv + h];
            for (size_t c = 0; c < sh.size(); ++c) {
                by[c * n_kv + h] = sh[c];
            }
            layer_any |= !sh.empty();
        }
        if (layer_any) {
            const size_t head_row = ggml_row_size(k->type, hd);
            ggml_tensor * rows = ggml_view_3d(ctx, k, hd, 1, kv_size * n_kv, head_row, head_row, stream * k->nb[2]);
            ggml_tensor * pos  = g.input(GGML_TYPE_I32, kv_size * n_kv, 1, by);
            ggml_build_forward_expand(g.gf, st.kv->build_k_shift(ctx, st.lctx->get_cparams(), rows, pos, rot, il));
            any = true;
        }
        ggml_tensor * ring = st.ring[il];
        if (query_shift != 0 && ring) {
            // the sequence's ring rows are f32: the K-shift ropes them in place, so the Hadamard rotation is undone and
            // redone around it
            ggml_tensor * rows = ggml_view_2d(ctx, ring, ring->ne[0], seq.window, ring->nb[1], seq.ring_row0 * ring->nb[1]);
            ggml_tensor * q = ggml_reshape_3d(ctx, rows, hd, ring->ne[0] / hd, seq.window);
            if (!query_pos) {
                query_pos = g.input(GGML_TYPE_I32, seq.window, 1, std::vector<int32_t>(seq.window, query_shift));
            }
            ggml_tensor * turned = st.kv->build_k_shift(ctx, st.lctx->get_cparams(), rot ? llama_mul_mat_hadamard(ctx, q, rot) : q,
                                                        query_pos, nullptr, il);
            ggml_build_forward_expand(g.gf, rot ? ggml_cpy(ctx, llama_mul_mat_hadamard(ctx, turned, rot), q) : turned);
            any = true;
        }
    }
    if (any && !g.compute(st)) {
        return set_error(ERR_COMPUTE, "RoPE shift graph of the rows and queries failed to allocate or compute");
    }
    return 0;
}

} // namespace kv_evict
