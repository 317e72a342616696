// KNorm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"; kvpress's
// KnormPress): a cell scores minus its key's L2 norm, per layer and KV head. No query takes part, so what is kept does
// not depend on what the window was asking when the eviction came.
#include "kv-evict-state.h"
#include "kv-evict-graph.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

namespace kv_evict {

int32_t key_norm_scores(llama_kv_evict_state & st, uint32_t stream, seq_scores & out) {
    const llama_hparams & hparams = st.lctx->get_model().hparams;
    const auto layer_ids = st.kv->get_layer_ids();
    const int64_t n_layer_kv = layer_ids.size();
    const int64_t n_kv       = hparams.n_head_kv(layer_ids[0]);
    const int64_t n_prefix   = out.n_prefix();
    out.score.assign(n_layer_kv * n_kv * n_prefix, 0.0f);
    if (n_prefix == 0) {
        return 0;
    }

    const int32_t graph_size = 8 * (int32_t) n_layer_kv + 64;
    if (int32_t err = ensure_sched(st, graph_size)) {
        return err;
    }
    evict_graph g(graph_size);
    ggml_context * ctx = g.ctx.get();
    ggml_tensor * cell_idx = g.input(GGML_TYPE_I32, n_prefix, 1, std::vector<int32_t>(out.cells.begin(), out.cells.begin() + n_prefix));
    std::vector<ggml_tensor *> norms(n_layer_kv);
    for (int64_t l = 0; l < n_layer_kv; ++l) {
        const int32_t il = layer_ids[l];
        // a head's row as the cell holds it (head granularity may have moved rows); a Hadamard-rotated K cache needs no
        // rotating back, since the rotation keeps L2 norms
        ggml_tensor * k = gather_rows(ctx, st.kv->get_k_storage(il), stream, cell_idx);       // [hd*n_kv, n_prefix]
        k = ggml_reshape_2d(ctx, k, hparams.n_embd_head_k(il), n_kv * n_prefix);
        norms[l] = g.output(ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, k))));           // [1, n_kv*n_prefix]
    }
    if (!g.compute(st)) {
        return set_error(ERR_COMPUTE, "key-norm graph failed to allocate or compute");
    }

    std::vector<float> norm(n_kv * n_prefix);
    for (int64_t l = 0; l < n_layer_kv; ++l) {
        ggml_backend_tensor_get(norms[l], norm.data(), 0, ggml_nbytes(norms[l]));
        for (int64_t i = 0; i < n_prefix; ++i) {
            for (int64_t gk = 0; gk < n_kv; ++gk) {
                out.score[(l * n_kv + gk) * n_prefix + i] = -norm[i * n_kv + gk];
            }
        }
    }
    return 0;
}

} // namespace kv_evict
