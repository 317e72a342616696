// Projected-value norms |V_i W_O^h|_1 of cells: fused kernels where W_O and the V cache lie on their backend (native/cpu,
// native/cuda), plain ggml ops elsewhere.
#include "kv-evict-state.h"
#include "kv-evict-graph.h"
#include "kv-evict-kernels.h"
#ifdef PYLLMKV_CUDA
#include "cuda/kernels-cuda.h"
#endif

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <string>

namespace kv_evict {

namespace {

// The same for a transposed V cache (element (cell i, dim j) at i + j*kv_size): transpose it back first
ggml_tensor * gather_rows_transposed(ggml_context * ctx, ggml_tensor * cache, uint32_t stream, ggml_tensor * cell_idx) {
    const int64_t kv_size = cache->ne[1];
    const int64_t n_embd  = cache->ne[0];
    ggml_tensor * vt = ggml_view_2d(ctx, cache, kv_size, n_embd, ggml_row_size(cache->type, kv_size), stream * cache->nb[2]);
    return ggml_get_rows(ctx, ggml_cont(ctx, ggml_transpose(ctx, vt)), cell_idx);
}

// The rows of the cells cell_idx of layer il's V cache as f32 [n_embd_v_gqa, m], rotated back if llama.cpp stores V
// Hadamard-rotated (the rotation is its own inverse)
ggml_tensor * gather_v(evict_graph & g, llama_kv_evict_state & st, uint32_t stream, ggml_tensor * cell_idx, int32_t il) {
    ggml_context * ctx = g.ctx.get();
    ggml_tensor * vcache = st.kv->get_v_storage(il);
    ggml_tensor * v = st.kv->get_v_trans() ? gather_rows_transposed(ctx, vcache, stream, cell_idx)
                                           : gather_rows(ctx, vcache, stream, cell_idx);
    if (ggml_tensor * v_rot = st.kv->build_input_v_rot(ctx)) {
        g.fillers.push_back([&st, v_rot]() { st.kv->set_input_v_rot(v_rot); });
        v = llama_mul_mat_hadamard(ctx, v, v_rot);
    }
    return v;
}

// The plain ggml ops: W_O is dequantised by a product with the identity, since mul_mat is the one op every buffer
// type (also the CPU repacked ones, which cannot be read back) supports for every weight type; [1, m, n_head]
ggml_tensor * value_norms_graph(ggml_context * ctx, evict_graph & g, const llama_model & model, ggml_tensor * v, int32_t il) {
    const llama_hparams & hparams = model.hparams;
    const int64_t hd     = hparams.n_embd_head_v(il);
    const int64_t n_head = hparams.n_head(il);
    const int64_t n_kv   = hparams.n_head_kv(il);
    const int64_t k_in   = hd * n_head;
    const int64_t m      = v->ne[1];

    // the identity made on the backend from a row of ones: as an input it crossed to the device (or over RPC) whole,
    // k_in^2 floats per layer per eviction
    ggml_tensor * eye = ggml_diag(ctx, g.input(GGML_TYPE_F32, k_in, 1, std::vector<float>(k_in, 1.0f)));
    ggml_tensor * w = ggml_mul_mat(ctx, model.layers[il].wo, eye);                   // [n_embd, k_in]
    w = ggml_cont(ctx, ggml_transpose(ctx, w));                                       // [k_in, n_embd]
    w = ggml_reshape_3d(ctx, w, hd, n_head, w->ne[1]);
    w = ggml_cont(ctx, ggml_permute(ctx, w, 0, 2, 1, 3));                             // [hd, n_embd, n_head]

    v = ggml_reshape_3d(ctx, v, hd, n_kv, m);
    v = ggml_cont(ctx, ggml_permute(ctx, v, 0, 2, 1, 3));                             // [hd, m, n_kv]
    v = ggml_reshape_4d(ctx, v, hd, m, 1, n_kv);
    v = ggml_repeat_4d(ctx, v, hd, m, n_head / n_kv, n_kv);                           // query head h reads KV head h / group
    v = ggml_reshape_3d(ctx, v, hd, m, n_head);

    ggml_tensor * y = ggml_mul_mat(ctx, w, v);                                        // [n_embd, m, n_head]
    if (model.layers[il].wo_s) {
        y = ggml_mul(ctx, y, model.layers[il].wo_s);
    }
    return ggml_sum_rows(ctx, ggml_abs(ctx, y));
}

#ifdef PYLLMKV_CUDA
// The CUDA kernel (native/cuda/) on f32 W_O and V that a graph prepared on the CUDA backend, one layer at a time so
// that one dequantised W_O is alive at once
int32_t value_norms_cuda(llama_kv_evict_state & st, uint32_t stream, const std::vector<int32_t> & idx,
        std::vector<std::vector<float>> & out /* [layer_kv][h * m + i] */) {
    const llama_model   & model   = st.lctx->get_model();
    const llama_hparams & hparams = model.hparams;
    const auto layer_ids = st.kv->get_layer_ids();
    const int64_t m = idx.size();
    for (size_t l = 0; l < layer_ids.size(); ++l) {
        const int32_t il = layer_ids[l];
        ggml_tensor * wo = model.layers[il].wo;
        evict_graph g(64);
        ggml_context * ctx = g.ctx.get();
        std::vector<int32_t> rows(wo->ne[1]);
        for (size_t j = 0; j < rows.size(); ++j) {
            rows[j] = (int32_t) j;
        }
        ggml_tensor * w = ggml_get_rows(ctx, wo, g.input(GGML_TYPE_I32, rows.size(), 1, rows)); // [k_in, n_embd] f32
        if (model.layers[il].wo_s) {
            w = ggml_mul(ctx, w, ggml_reshape_2d(ctx, model.layers[il].wo_s, 1, wo->ne[1]));
        }
        ggml_tensor * v = gather_v(g, st, stream, g.input(GGML_TYPE_I32, m, 1, idx), il);
        g.output(w);
        g.output(v);
        if (!g.compute(st)) {
            return set_error(ERR_COMPUTE, "value-norm input graph failed to allocate or compute");
        }
        out[l].resize(m * hparams.n_head(il));
        if (pyllmkv_value_norm_cuda((const float *) w->data, (const float *) v->data, out[l].data(), m, hparams.n_head(il),
                                    hparams.n_head_kv(il), hparams.n_embd_head_v(il), wo->ne[1]) != 0) {
            return set_error(ERR_COMPUTE, "the CUDA value-norm kernel failed");
        }
    }
    return 0;
}
#endif

// Which kernel computes the norms: a fused one where the weights and cache lie on its backend, else plain ggml ops.
// LLAMA_KV_EVICT_VALUE_NORMS=graph forces the latter, =f32 the CPU kernel's float product where it would run in int8
scoring_kernel pick_value_norm_kernel(const llama_kv_evict_state & st) {
    const llama_model & model = st.lctx->get_model();
    if (graph_forced("LLAMA_KV_EVICT_VALUE_NORMS")) {
        return KERNEL_GGML_GRAPH;
    }
    const char * force = getenv("LLAMA_KV_EVICT_VALUE_NORMS");
    bool cpu = true, int8 = !(force && std::string(force) == "f32"), cuda = true;
    for (uint32_t il : st.kv->get_layer_ids()) {
        const auto & layer = model.layers[il];
        cpu  = cpu && value_norm_cpu_supports(layer.wo, layer.wo_s);
        int8 = int8 && value_norm_cpu_int8(layer.wo, model.hparams.n_head(il));
        cuda = cuda && cuda_supports(layer.wo, st.kv->get_v_storage(il));
    }
    return cpu ? (int8 ? KERNEL_FUSED_CPU_INT8 : KERNEL_FUSED_CPU) : cuda ? KERNEL_FUSED_CUDA : KERNEL_GGML_GRAPH;
}

} // namespace

// |V_i W_O^h|_1 for the given cells, per layer and query head, then averaged over each KV head's query group.
int32_t compute_value_norms(llama_kv_evict_state & st, uint32_t stream, const std::vector<uint32_t> & cells,
        std::vector<std::vector<float>> & norms /* [layer_kv][cell * n_head_kv + g] */) {
    const llama_model   & model   = st.lctx->get_model();
    const llama_hparams & hparams = model.hparams;
    const auto layer_ids = st.kv->get_layer_ids();
    norms.assign(layer_ids.size(), std::vector<float>(cells.size() * hparams.n_head_kv(layer_ids[0]), 0.0f));
    if (cells.empty()) {
        return 0;
    }

    const int32_t graph_size = 64 * (int32_t) layer_ids.size() + 256;
    if (int32_t err = ensure_sched(st, graph_size)) {
        return err;
    }
    const scoring_kernel kernel = pick_value_norm_kernel(st);
    st.value_norm_kernel = kernel;

    // bound the graph's [n_embd, cells, n_head] product to ~64 MiB; the fused kernels need only the cells' V rows
    const int64_t n_head_max = hparams.n_head(layer_ids[0]);
    const int64_t chunk = kernel != KERNEL_GGML_GRAPH ? 4096 :
                          std::clamp<int64_t>((64ll << 20) / (4 * (int64_t) hparams.n_embd * n_head_max), 1, 512);

    for (size_t c0 = 0; c0 < cells.size(); c0 += chunk) {
        const int64_t m = std::min<int64_t>(chunk, cells.size() - c0);
        std::vector<int32_t> idx(cells.begin() + c0, cells.begin() + c0 + m);
        std::vector<std::vector<float>> buf(layer_ids.size()); // [layer_kv][h * m + i]

        if (kernel == KERNEL_FUSED_CUDA) {
#ifdef PYLLMKV_CUDA
            if (int32_t err = value_norms_cuda(st, stream, idx, buf)) {
                return err;
            }
#endif
        } else {
            evict_graph g(graph_size);
            ggml_context * ctx = g.ctx.get();
            ggml_tensor * cell_idx = g.input(GGML_TYPE_I32, m, 1, idx);
            std::vector<ggml_tensor *> outs;
            for (uint32_t il : layer_ids) {
                ggml_tensor * v = gather_v(g, st, stream, cell_idx, il);
                ggml_tensor * n = kernel == KERNEL_GGML_GRAPH
                    ? value_norms_graph(ctx, g, model, v, il)                                          // [1, m, n_head]
                    : value_norm_cpu_op(ctx, v, model.layers[il].wo, model.layers[il].wo_s, hparams.n_head(il),
                                        kernel == KERNEL_FUSED_CPU_INT8);                              // [m, n_head]
                outs.push_back(g.output(n));
            }
            if (!g.compute(st)) {
                return set_error(ERR_COMPUTE, "value-norm graph failed to allocate or compute");
            }
            for (size_t l = 0; l < layer_ids.size(); ++l) {
                buf[l].resize(ggml_nelements(outs[l]));
                ggml_backend_tensor_get(outs[l], buf[l].data(), 0, ggml_nbytes(outs[l]));
            }
        }

        for (size_t l = 0; l < layer_ids.size(); ++l) {
            const int32_t il     = layer_ids[l];
            const int64_t n_kv   = hparams.n_head_kv(il);
            const int64_t group  = hparams.n_head(il) / n_kv;
            for (int64_t i = 0; i < m; ++i) {
                for (int64_t gk = 0; gk < n_kv; ++gk) {
                    double sum = 0.0;
                    for (int64_t j = 0; j < group; ++j) {
                        sum += buf[l][(gk * group + j) * m + i];
                    }
                    norms[l][(c0 + i) * n_kv + gk] = (float) (sum / group);
                }
            }
        }
    }
    return 0;
}

} // namespace kv_evict
