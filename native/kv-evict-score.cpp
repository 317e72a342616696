// Scoring graphs: window attention over a sequence's cells and projected-value norms, as ggml graphs run on the
// backends that hold the cache, so every backend ggml supports computes them with its own kernels.
#include "kv-evict-state.h"
#include "kv-evict-graph.h"
#include "kv-evict-select.h"
#include "kv-evict-kernels.h"
#ifdef PYLLMKV_CUDA
#include "cuda/kernels-cuda.h"
#endif

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

namespace kv_evict {

namespace {

// A stream's rows of a cache tensor stored per cell ([n_embd_gqa, kv_size, n_stream])
ggml_tensor * stream_rows(ggml_context * ctx, ggml_tensor * cache, uint32_t stream) {
    return ggml_view_2d(ctx, cache, cache->ne[0], cache->ne[1], cache->nb[1], stream * cache->nb[2]);
}

// The sequence's rows of such a cache tensor, gathered as f32
ggml_tensor * gather_rows(ggml_context * ctx, ggml_tensor * cache, uint32_t stream, ggml_tensor * cell_idx) {
    return ggml_get_rows(ctx, stream_rows(ctx, cache, stream), cell_idx);
}

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

    std::vector<float> eye(k_in * k_in, 0.0f);
    for (int64_t i = 0; i < k_in; ++i) {
        eye[i * k_in + i] = 1.0f;
    }
    ggml_tensor * w = ggml_mul_mat(ctx, model.layers[il].wo, g.input(GGML_TYPE_F32, k_in, k_in, eye)); // [n_embd, k_in]
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

// Whether the environment variable `name` asks for plain ggml ops (tests and benchmarks compare them with the fused
// kernels)
bool graph_forced(const char * name) {
    const char * force = getenv(name);
    return force && std::string(force) == "graph";
}

// Which kernel computes the norms: a fused one where the weights and cache lie on its backend, else plain ggml ops.
// LLAMA_KV_EVICT_VALUE_NORMS=graph forces the latter
scoring_kernel pick_value_norm_kernel(const llama_kv_evict_state & st) {
    const llama_model & model = st.lctx->get_model();
    if (graph_forced("LLAMA_KV_EVICT_VALUE_NORMS")) {
        return KERNEL_GGML_GRAPH;
    }
    bool cpu = true, cuda = true;
    for (uint32_t il : st.kv->get_layer_ids()) {
        const auto & layer = model.layers[il];
        cpu  = cpu && value_norm_cpu_supports(layer.wo, layer.wo_s);
        cuda = cuda && cuda_supports(layer.wo, st.kv->get_v_storage(il));
    }
    return cpu ? KERNEL_FUSED_CPU : cuda ? KERNEL_FUSED_CUDA : KERNEL_GGML_GRAPH;
}

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
                ggml_tensor * n = kernel == KERNEL_FUSED_CPU
                    ? value_norm_cpu_op(ctx, v, model.layers[il].wo, model.layers[il].wo_s, hparams.n_head(il)) // [m, n_head]
                    : value_norms_graph(ctx, g, model, v, il);                                                  // [1, m, n_head]
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

// DefensiveKV's maximum over the window's queries of each query's prefix row (of a, the softmax [n, n_q, n_head]),
// pooled over `kernel` cells with zero padding and rescaled to the row's prefix mass; [n, n_head], 0 past n_prefix
ggml_tensor * pooled_max_graph(ggml_context * ctx, ggml_tensor * a, int64_t n_prefix, int32_t kernel) {
    const int64_t n = a->ne[0], n_q = a->ne[1], n_head = a->ne[2];
    ggml_tensor * prefix = ggml_cont(ctx, ggml_view_3d(ctx, a, n_prefix, n_q, n_head, a->nb[1], a->nb[2], 0));
    const int half = kernel / 2;
    ggml_tensor * pooled = ggml_pool_1d(ctx, ggml_pad_ext(ctx, prefix, half, half, 0, 0, 0, 0, 0, 0), GGML_OP_POOL_AVG,
                                        2 * half + 1, 1, 0);                              // [n_prefix, n_q, n_head]
    // a row with no prefix mass stays 0 rather than 0 / 0
    ggml_tensor * rescale = ggml_div(ctx, ggml_sum_rows(ctx, prefix), ggml_scale_bias(ctx, ggml_sum_rows(ctx, pooled), 1.0f, 1e-30f));
    pooled = ggml_cont(ctx, ggml_permute(ctx, ggml_mul(ctx, pooled, rescale), 1, 0, 2, 3)); // [n_q, n_prefix, n_head]
    ggml_tensor * best = ggml_pool_1d(ctx, pooled, GGML_OP_POOL_MAX, n_q, n_q, 0);       // [1, n_prefix, n_head]
    return ggml_pad(ctx, ggml_reshape_2d(ctx, best, n_prefix, n_head), n - n_prefix, 0, 0, 0);
}

// Which kernel computes the window attention: the fused CPU one where every layer's K cache and query ring lie on the
// CPU, else plain ggml ops. On CUDA the ggml graph is the fast one: it scores every layer in one graph, where a kernel
// outside ggml needs a gather graph, a synchronisation and its own buffers per layer (a fused CUDA kernel measured 3.3
// to 4.5x slower than the graph on an H200). LLAMA_KV_EVICT_WINDOW_ATTN=graph forces the graph on the CPU
scoring_kernel pick_window_attn_kernel(const llama_kv_evict_state & st) {
    if (graph_forced("LLAMA_KV_EVICT_WINDOW_ATTN")) {
        return KERNEL_GGML_GRAPH;
    }
    const llama_hparams & hparams = st.lctx->get_model().hparams;
    for (uint32_t il : st.kv->get_layer_ids()) {
        if (!window_attn_cpu_supports(st.kv->get_k_storage(il), st.ring[il], hparams.n_embd_head_k(il))) {
            return KERNEL_GGML_GRAPH;
        }
    }
    return KERNEL_FUSED_CPU;
}

} // namespace

int32_t ensure_sched(llama_kv_evict_state & st, int32_t graph_size) {
    if (st.sched && st.sched_graph_size >= graph_size) {
        return 0;
    }
    ggml_backend_sched_t lsched = st.lctx->get_sched();
    std::vector<ggml_backend_t> backends;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(lsched); ++i) {
        backends.push_back(ggml_backend_sched_get_backend(lsched, i));
    }
    st.sched.reset(ggml_backend_sched_new(backends.data(), nullptr, backends.size(), graph_size, false, st.lctx->get_cparams().op_offload));
    st.sched_graph_size = graph_size;
    return st.sched ? 0 : set_error(ERR_COMPUTE, "cannot create the scoring scheduler");
}

int32_t score_sequence(llama_kv_evict_state & st, llama_seq_id seq_id, bool need_norms, bool commit, seq_scores & out) {
    const llama_model   & model   = st.lctx->get_model();
    const llama_hparams & hparams = model.hparams;
    const auto & p = st.params;
    const auto layer_ids = st.kv->get_layer_ids();
    const int64_t n_layer_kv = layer_ids.size();
    const int64_t n_kv       = hparams.n_head_kv(layer_ids[0]);
    const uint32_t stream    = st.kv->get_stream(seq_id);
    const auto & cells       = st.kv->get_cells(seq_id);

    out = seq_scores();
    for (const auto & [pos, cell] : cells.seq_pos_get(seq_id)) {
        out.pos.push_back(pos);
        out.cells.push_back(cell);
    }
    const int64_t n = out.pos.size();
    if (n == 0) {
        return 0;
    }
    const llama_pos pos_max = out.pos.back();
    for (int64_t i = n - 1; i >= 0 && out.pos[i] > pos_max - p.window; --i) {
        out.n_window++;
    }
    const int64_t n_prefix = out.n_prefix();

    // side data follows the cell: reset it for cells that hold new K/V since the last scoring
    const uint32_t kv_size = st.kv->get_size();
    std::vector<uint32_t> norm_todo;
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t c = out.cells[i];
        if (st.holds_new_token(c, out.pos[i])) {
            st.side_pos[c]   = out.pos[i];
            st.norm_valid[c] = 0;
            for (int64_t l = 0; l < n_layer_kv; ++l) {
                std::fill_n(st.h2o_acc.begin() + (l * kv_size + c) * n_kv, n_kv, 0.0f);
                std::fill_n(st.head_pos.begin() + (l * kv_size + c) * n_kv, n_kv, out.pos[i]);
                std::fill_n(st.head_absent.begin() + (l * kv_size + c) * n_kv, n_kv, 0);
            }
        }
        if (need_norms && i < n_prefix && !st.norm_valid[c]) {
            norm_todo.push_back(c);
        }
    }
    // AdaKV: the (head, cell) pairs that hold no token, for the whole sequence (the window holds every head)
    std::vector<uint8_t> absent_all;
    if (st.any_absent) {
        absent_all.assign(n_layer_kv * n_kv * n, 0);
        out.absent.assign(n_layer_kv * n_kv * n_prefix, 0);
        for (int64_t l = 0; l < n_layer_kv; ++l) {
            for (int64_t g = 0; g < n_kv; ++g) {
                for (int64_t i = 0; i < n; ++i) {
                    absent_all[(l * n_kv + g) * n + i] = st.absent(l, out.cells[i], out.pos[i], g);
                    if (i < n_prefix) {
                        out.absent[(l * n_kv + g) * n_prefix + i] = absent_all[(l * n_kv + g) * n + i];
                    }
                }
            }
        }
    }
    if (commit || need_norms) {
        st.min_written = pos_max + 1;
    }

    if (!norm_todo.empty()) {
        std::vector<std::vector<float>> norms;
        if (int32_t err = compute_value_norms(st, stream, norm_todo, norms)) {
            return err;
        }
        for (size_t j = 0; j < norm_todo.size(); ++j) {
            const uint32_t c = norm_todo[j];
            for (int64_t l = 0; l < n_layer_kv; ++l) {
                std::copy_n(norms[l].begin() + j * n_kv, n_kv, st.value_norm.begin() + (l * kv_size + c) * n_kv);
            }
            st.norm_valid[c] = 1;
        }
    }
    if (need_norms) {
        out.value_norm.resize(n_layer_kv * n_kv * n_prefix);
        for (int64_t l = 0; l < n_layer_kv; ++l) {
            for (int64_t gk = 0; gk < n_kv; ++gk) {
                for (int64_t i = 0; i < n_prefix; ++i) {
                    out.value_norm[(l * n_kv + gk) * n_prefix + i] = st.value_norm[(l * kv_size + out.cells[i]) * n_kv + gk];
                }
            }
        }
    }

    if (p.policy == LLAMA_KV_EVICT_POLICY_STREAMING) {
        return 0;
    }

    // the window's queries: ring slots holding positions inside the window, in position order
    std::vector<int32_t>   q_slot;
    std::vector<llama_pos> q_pos;
    st.window_slots(pos_max, q_slot, q_pos);
    const int64_t n_q = q_slot.size();
    if (n_q == 0) {
        return set_error(ERR_NO_QUERIES, "no queries were captured for this sequence: decode at least one token after llama_kv_evict_enable, or "
                                         "after loading a state without what llama_kv_evict_seq_get_data saved beside it");
    }

    // how much each query counts: the window mean, the last query alone (TOVA), or the queries not yet accumulated (H2O)
    std::vector<float> q_weight(n_q, 1.0f / n_q);
    if (p.policy == LLAMA_KV_EVICT_POLICY_TOVA) {
        std::fill(q_weight.begin(), q_weight.end(), 0.0f);
        q_weight.back() = 1.0f;
    } else if (p.policy == LLAMA_KV_EVICT_POLICY_H2O) {
        for (int64_t j = 0; j < n_q; ++j) {
            q_weight[j] = q_pos[j] > st.h2o_last ? 1.0f : 0.0f;
        }
    }

    std::vector<float> mask(n * n_q);
    for (int64_t j = 0; j < n_q; ++j) {
        for (int64_t i = 0; i < n; ++i) {
            mask[j * n + i] = out.pos[i] <= q_pos[j] ? 0.0f : -INFINITY;
        }
    }
    std::vector<int32_t> cell_i32(out.cells.begin(), out.cells.end());
    // DefensiveKV takes, besides the window's mean, a maximum over its queries of their pooled prefix rows
    const bool defensive = is_defensive(p.policy);
    if (defensive && n_prefix == 0) {
        return 0;
    }

    const int32_t graph_size = 64 * (int32_t) n_layer_kv + 256;
    if (int32_t err = ensure_sched(st, graph_size)) {
        return err;
    }
    evict_graph g(graph_size);
    ggml_context * ctx = g.ctx.get();
    ggml_tensor * cell_idx = g.input(GGML_TYPE_I32, n, 1, cell_i32);
    ggml_tensor * slot_idx = g.input(GGML_TYPE_I32, n_q, 1, q_slot);
    ggml_tensor * kq_mask  = g.input(GGML_TYPE_F32, n, n_q, mask);
    ggml_tensor * weight   = g.input(GGML_TYPE_F32, n_q, 1, q_weight);
    const scoring_kernel kernel = pick_window_attn_kernel(st);
    st.window_attn_kernel = kernel;
    // [layer_kv][h * n + i]: each cell's weighted window attention, then for DefensiveKV its pooled maximum
    std::vector<std::vector<float>> attn(n_layer_kv);
    std::vector<ggml_tensor *> outs(n_layer_kv, nullptr), maxs(n_layer_kv, nullptr);
    std::vector<window_attn_args> args(n_layer_kv);
    for (int64_t l = 0; l < n_layer_kv; ++l) {
        const int32_t il     = layer_ids[l];
        const int64_t hd     = hparams.n_embd_head_k(il);
        const int64_t n_head = hparams.n_head(il);

        // AdaKV: the cells a head holds no token in, as the model's own attention masks them (llama_kv_evict_attn)
        std::vector<float> hm;
        if (!absent_all.empty()) {
            const int64_t group = n_head / n_kv;
            hm.assign(n * n_head, 0.0f);
            for (int64_t h = 0; h < n_head; ++h) {
                for (int64_t i = 0; i < n; ++i) {
                    hm[h * n + i] = absent_all[(l * n_kv + h / group) * n + i] ? -INFINITY : 0.0f;
                }
            }
        }
        ggml_tensor * head_mask = hm.empty() ? nullptr : g.input(GGML_TYPE_F32, n, n_head, hm);

        ggml_tensor * q = ggml_get_rows(ctx, st.ring[il], slot_idx);                     // [hd*n_head, n_q]
        ggml_tensor * s = nullptr;                                                       // [n, n_head] summed attention
        if (kernel == KERNEL_FUSED_CPU) {
            args[l] = {st.kq_scale[il], defensive, n_prefix, p.pool_kernel};
            s = window_attn_cpu_op(ctx, stream_rows(ctx, st.kv->get_k_storage(il), stream), q, cell_idx, kq_mask, weight,
                                   head_mask, n_head, &args[l]);
        } else {
            q = ggml_permute(ctx, ggml_reshape_3d(ctx, q, hd, n_head, n_q), 0, 2, 1, 3); // [hd, n_q, n_head]
            ggml_tensor * k = gather_rows(ctx, st.kv->get_k_storage(il), stream, cell_idx); // [hd*n_kv, n]
            k = ggml_permute(ctx, ggml_reshape_3d(ctx, k, hd, n_kv, n), 0, 2, 1, 3);     // [hd, n, n_kv]

            ggml_tensor * kq = ggml_mul_mat(ctx, k, q);                                  // [n, n_q, n_head]
            ggml_tensor * mask = kq_mask;
            if (head_mask) {
                mask = ggml_add(ctx, ggml_repeat_4d(ctx, kq_mask, n, n_q, n_head, 1), ggml_reshape_3d(ctx, head_mask, n, 1, n_head));
            }
            ggml_tensor * a = ggml_soft_max_ext(ctx, kq, mask, st.kq_scale[il], 0.0f);  // [n, n_q, n_head]
            if (defensive) {
                maxs[l] = g.output(pooled_max_graph(ctx, a, n_prefix, p.pool_kernel));
            }
            a = ggml_cont(ctx, ggml_permute(ctx, a, 1, 0, 2, 3));                        // [n_q, n, n_head]
            s = ggml_sum_rows(ctx, ggml_mul(ctx, a, weight));                            // [1, n, n_head]
        }
        outs[l] = g.output(s);
    }
    if (!g.compute(st)) {
        return set_error(ERR_COMPUTE, "attention-score graph failed to allocate or compute");
    }
    for (int64_t l = 0; l < n_layer_kv; ++l) {
        const size_t bytes = ggml_nbytes(outs[l]);
        attn[l].resize((bytes + (maxs[l] ? ggml_nbytes(maxs[l]) : 0)) / sizeof(float));
        ggml_backend_tensor_get(outs[l], attn[l].data(), 0, bytes);
        if (maxs[l]) {
            ggml_backend_tensor_get(maxs[l], attn[l].data() + bytes / sizeof(float), 0, ggml_nbytes(maxs[l]));
        }
    }

    out.score.assign(n_layer_kv * n_kv * n_prefix, 0.0f);
    if (defensive) {
        for (int64_t l = 0; l < n_layer_kv; ++l) {
            const int64_t n_head = hparams.n_head(layer_ids[l]);
            const std::vector<float> s = defensive_scores(attn[l].data(), attn[l].data() + n_head * n, n, n_prefix, n_head,
                                                          n_kv, out.value_norm.data() + l * n_kv * n_prefix,
                                                          p.budget - out.n_window);
            std::copy(s.begin(), s.end(), out.score.begin() + l * n_kv * n_prefix);
        }
        return 0;
    }
    const bool pooled = p.policy != LLAMA_KV_EVICT_POLICY_H2O && p.policy != LLAMA_KV_EVICT_POLICY_TOVA;
    std::vector<float> pool_buf(n_prefix);
    for (int64_t l = 0; l < n_layer_kv; ++l) {
        const int32_t il     = layer_ids[l];
        const int64_t n_head = hparams.n_head(il);
        const int64_t group  = n_head / n_kv;
        const std::vector<float> & s = attn[l];

        for (int64_t h = 0; h < n_head; ++h) {
            const float * sh = s.data() + h * n;
            const float * src = sh;
            if (pooled && p.pool_kernel > 1) {
                pool_avg(sh, n_prefix, p.pool_kernel, pool_buf.data());
                src = pool_buf.data();
            }
            float * dst = out.score.data() + (l * n_kv + h / group) * n_prefix;
            for (int64_t i = 0; i < n_prefix; ++i) {
                dst[i] += src[i] / group;
            }
        }

        if (p.policy == LLAMA_KV_EVICT_POLICY_H2O) {
            // window cells accumulate too: they are scored once they leave the window
            for (int64_t gk = 0; gk < n_kv; ++gk) {
                for (int64_t i = 0; i < n; ++i) {
                    float new_attn = 0.0f;
                    for (int64_t j = 0; j < group; ++j) {
                        new_attn += s[(gk * group + j) * n + i] / group;
                    }
                    float & acc = st.h2o_acc[(l * kv_size + out.cells[i]) * n_kv + gk];
                    if (i < n_prefix) {
                        out.score[(l * n_kv + gk) * n_prefix + i] = acc + new_attn;
                    }
                    if (commit) {
                        acc += new_attn;
                    }
                }
            }
        }
    }
    if (commit && p.policy == LLAMA_KV_EVICT_POLICY_H2O) {
        st.h2o_last = q_pos.back();
    }
    return 0;
}

} // namespace kv_evict
