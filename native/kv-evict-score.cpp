// Scoring a sequence: the window's attention over its cells (the fused CPU kernel, or a ggml graph on the backends
// that hold the cache, so every backend ggml supports computes it with its own kernels), then the policy's scorer and
// rescale (kv-evict-policy.h).
#include "kv-evict-state.h"
#include "kv-evict-graph.h"
#include "kv-evict-select.h"
#include "kv-evict-kernels.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kv_evict {

namespace {

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

// The policy's rescale of out.score by the value norms, then the cells the scorer protects at their layer's maximum
// (protect: per layer, indices into its [n_kv][n_prefix] scores; may be empty)
static void rescale_scores(const policy & pol, int64_t n_layer_kv, int64_t n_kv, const std::vector<std::vector<int64_t>> & protect,
        seq_scores & out) {
    const int64_t n_prefix = out.n_prefix();
    for (int64_t l = 0; l < n_layer_kv; ++l) {
        float * score = out.score.data() + l * n_kv * n_prefix;
        if (pol.weigh == rescale::norm_share) {
            norm_share(score, out.value_norm.data() + l * n_kv * n_prefix, n_kv, n_prefix);
        }
        if (l < (int64_t) protect.size() && !protect[l].empty()) {
            const float top = *std::max_element(score, score + n_kv * n_prefix);
            for (int64_t k : protect[l]) {
                score[k] = top;
            }
        }
    }
}

// score_sequence's scoring, before its two policy rules: DefensiveKV's norms and the given share's guard
static int32_t score_cells(llama_kv_evict_state & st, llama_seq_id seq_id, bool need_norms, bool commit, seq_scores & out,
        llama_pos probe_end) {
    const llama_model   & model   = st.lctx->get_model();
    const llama_hparams & hparams = model.hparams;
    const auto & p = st.params;
    const auto layer_ids = st.kv->get_layer_ids();
    const int64_t n_layer_kv = layer_ids.size();
    const int64_t n_kv       = hparams.n_head_kv(layer_ids[0]);
    const uint32_t stream    = st.kv->get_stream(seq_id);
    const auto & cells       = st.kv->get_cells(seq_id);
    kv_evict_seq & seq       = st.seqs[seq_id];

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
    // a probe's cells stand as the window: they neither get scores nor weigh in a head's mean, which floors the rest
    const llama_pos scored_below = probe_end >= 0 ? probe_end : pos_max - p.window + 1;
    for (int64_t i = n - 1; i >= 0 && out.pos[i] >= scored_below; --i) {
        out.n_window++;
    }
    const int64_t n_prefix = out.n_prefix();

    // side data follows the cell: reset it for cells that hold new K/V since the last scoring
    const uint32_t kv_size = st.kv->get_size();
    std::vector<uint32_t> norm_todo;
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t c = out.cells[i];
        if (seq.holds_new_token(c, out.pos[i])) {
            seq.side_pos[c]   = out.pos[i];
            seq.norm_valid[c] = 0;
            for (int64_t l = 0; l < n_layer_kv; ++l) {
                std::fill_n(seq.attn_sum.begin() + (l * kv_size + c) * n_kv, n_kv, 0.0f);
                std::fill_n(seq.probe_max.begin() + (l * kv_size + c) * n_kv, n_kv, 0.0f);
                std::fill_n(seq.head_pos.begin() + (l * kv_size + c) * n_kv, n_kv, out.pos[i]);
                std::fill_n(seq.head_absent.begin() + (l * kv_size + c) * n_kv, n_kv, 0);
            }
        }
        if (need_norms && i < n_prefix && !seq.norm_valid[c]) {
            norm_todo.push_back(c);
        }
    }
    // AdaKV: the (head, cell) pairs that hold no token, for the whole sequence (the window holds every head)
    std::vector<uint8_t> absent_all;
    if (seq.any_absent) {
        absent_all.assign(n_layer_kv * n_kv * n, 0);
        out.absent.assign(n_layer_kv * n_kv * n_prefix, 0);
        for (int64_t l = 0; l < n_layer_kv; ++l) {
            for (int64_t g = 0; g < n_kv; ++g) {
                for (int64_t i = 0; i < n; ++i) {
                    absent_all[(l * n_kv + g) * n + i] = seq.absent(l, out.cells[i], out.pos[i], g);
                    if (i < n_prefix) {
                        out.absent[(l * n_kv + g) * n_prefix + i] = absent_all[(l * n_kv + g) * n + i];
                    }
                }
            }
        }
    }
    const llama_pos written_from = seq.min_written;
    if (commit || need_norms) {
        seq.min_written = pos_max + 1;
    }

    if (!norm_todo.empty()) {
        const int64_t t_norms = ggml_time_us();
        std::vector<std::vector<float>> norms;
        if (int32_t err = compute_value_norms(st, stream, norm_todo, norms)) {
            return err;
        }
        if (commit) {
            seq.t_phase_us[EVICT_PHASE_NORMS] += ggml_time_us() - t_norms;
        }
        for (size_t j = 0; j < norm_todo.size(); ++j) {
            const uint32_t c = norm_todo[j];
            for (int64_t l = 0; l < n_layer_kv; ++l) {
                std::copy_n(norms[l].begin() + j * n_kv, n_kv, seq.value_norm.begin() + (l * kv_size + c) * n_kv);
            }
            seq.norm_valid[c] = 1;
        }
    }
    if (need_norms) {
        out.value_norm.resize(n_layer_kv * n_kv * n_prefix);
        for (int64_t l = 0; l < n_layer_kv; ++l) {
            for (int64_t gk = 0; gk < n_kv; ++gk) {
                for (int64_t i = 0; i < n_prefix; ++i) {
                    out.value_norm[(l * n_kv + gk) * n_prefix + i] = seq.value_norm[(l * kv_size + out.cells[i]) * n_kv + gk];
                }
            }
        }
    }

    const policy & pol = st.policy();
    if (seq.probed && probe_end < 0) {
        // ranked by what the repeat probes' queries gave each row, not by the window's
        out.score.resize(n_layer_kv * n_kv * n_prefix);
        std::vector<std::vector<int64_t>> protect(n_layer_kv);
        for (int64_t l = 0; l < n_layer_kv; ++l) {
            float * score = out.score.data() + l * n_kv * n_prefix;
            if (pol.score != scorer::window_max) {
                for (int64_t g = 0; g < n_kv; ++g) {
                    for (int64_t i = 0; i < n_prefix; ++i) {
                        score[g * n_prefix + i] = seq.probe_max[seq.side(l, out.cells[i], g)];
                    }
                }
                continue;
            }
            // DefensiveKV over every probe query at once: their maxima and attention sums stand as one window's
            // reductions, a KV head per head, the probes' own cells as one more cell holding their mean mass
            const int64_t n_cols = n_prefix + 1;
            std::vector<float> sums(n_kv * n_cols), maxima(n_kv * n_cols, 0.0f);
            for (int64_t g = 0; g < n_kv; ++g) {
                for (int64_t i = 0; i < n_prefix; ++i) {
                    sums[g * n_cols + i]   = seq.attn_sum[seq.side(l, out.cells[i], g)];
                    maxima[g * n_cols + i] = seq.probe_max[seq.side(l, out.cells[i], g)];
                }
                sums[g * n_cols + n_prefix] = seq.probe_n_q > 0 ? (float) (seq.probe_self_mass[l] / seq.probe_n_q) : 0.0f;
            }
            window_max_scores(sums.data(), maxima.data(), n_cols, n_prefix, n_kv, n_kv, p.budget - out.n_window, score,
                              protect[l]);
        }
        rescale_scores(pol, n_layer_kv, n_kv, protect, out);
        return 0;
    }
    if (pol.score == scorer::recency) {
        return 0;
    }
    if (pol.score == scorer::key_norm) {
        return key_norm_scores(st, stream, out);
    }
    if (pol.score == scorer::given) {
        return given_scores(st, seq_id, out);
    }

    // the window's queries: ring slots holding positions inside the window, in position order
    std::vector<int32_t>   q_slot;
    std::vector<llama_pos> q_pos;
    seq.window_slots(pos_max, q_slot, q_pos);
    const int64_t n_q = q_slot.size();
    if (n_q == 0) {
        return set_error(ERR_NO_QUERIES, "no queries were captured for this sequence: decode at least one token after llama_kv_evict_enable, or "
                                         "after loading a state without what llama_kv_evict_seq_get_data saved beside it");
    }

    // how much each query counts: the window mean, the last query alone (TOVA), or the queries not yet accumulated (H2O)
    std::vector<float> q_weight(n_q, 1.0f / n_q);
    if (pol.score == scorer::last_query) {
        std::fill(q_weight.begin(), q_weight.end(), 0.0f);
        q_weight.back() = 1.0f;
    } else if (pol.score == scorer::accumulated) {
        for (int64_t j = 0; j < n_q; ++j) {
            q_weight[j] = q_pos[j] > seq.h2o_last ? 1.0f : 0.0f;
        }
    } else if (probe_end >= 0 && pol.score == scorer::window_max) {
        // DefensiveKV sums a probe's attention: each query once, though a probe's last batch may be shorter than the window
        for (int64_t j = 0; j < n_q; ++j) {
            q_weight[j] = q_pos[j] >= written_from ? 1.0f : 0.0f;
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
    const bool defensive = pol.score == scorer::window_max;
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
    std::vector<std::vector<int64_t>> protect(n_layer_kv);
    std::vector<float> pool_buf(n_prefix);
    for (int64_t l = 0; l < n_layer_kv; ++l) {
        const int32_t il     = layer_ids[l];
        const int64_t n_head = hparams.n_head(il);
        const int64_t group  = n_head / n_kv;
        const std::vector<float> & s = attn[l];
        float * score = out.score.data() + l * n_kv * n_prefix;

        if (defensive && probe_end >= 0) {
            // the probe's pooled maxima and attention sums, over the group's heads; floor and stage 1 come at the
            // eviction, over every probe's queries
            double self_mass = 0.0;
            for (int64_t h = 0; h < n_head; ++h) {
                const int64_t g = h / group;
                for (int64_t i = 0; i < n; ++i) {
                    const float sum = s[h * n + i];
                    if (i >= n_prefix) {
                        self_mass += sum / n_head;
                        continue;
                    }
                    const size_t at = seq.side(l, out.cells[i], g);
                    seq.probe_max[at] = std::max(seq.probe_max[at], s[(n_head + h) * n + i]);
                    seq.attn_sum[at] += sum / group;
                }
            }
            seq.probe_self_mass[l] += self_mass;
            continue;
        }
        if (defensive) {
            window_max_scores(s.data(), s.data() + n_head * n, n, n_prefix, n_head, n_kv, p.budget - out.n_window, score,
                              protect[l]);
            continue;
        }
        for (int64_t h = 0; h < n_head; ++h) {
            const float * sh = s.data() + h * n;
            const float * src = sh;
            if (pol.pooled() && p.pool_kernel > 1) {
                pool_avg(sh, n_prefix, p.pool_kernel, pool_buf.data());
                src = pool_buf.data();
            }
            float * dst = score + (h / group) * n_prefix;
            for (int64_t i = 0; i < n_prefix; ++i) {
                dst[i] += src[i] / group;
            }
        }

        if (pol.score == scorer::accumulated) {
            // window cells accumulate too: they are scored once they leave the window
            for (int64_t gk = 0; gk < n_kv; ++gk) {
                for (int64_t i = 0; i < n; ++i) {
                    float new_attn = 0.0f;
                    for (int64_t j = 0; j < group; ++j) {
                        new_attn += s[(gk * group + j) * n + i] / group;
                    }
                    float & acc = seq.attn_sum[(l * kv_size + out.cells[i]) * n_kv + gk];
                    if (i < n_prefix) {
                        score[gk * n_prefix + i] = acc + new_attn;
                    }
                    if (commit) {
                        acc += new_attn;
                    }
                }
            }
        }
    }
    if (commit && pol.score == scorer::accumulated) {
        seq.h2o_last = q_pos.back();
    }

    if (probe_end >= 0) {
        seq.probe_n_q += defensive ? (int64_t) std::accumulate(q_weight.begin(), q_weight.end(), 0.0f) : n_q;
        if (!defensive) { // DefensiveKV's reductions were folded above; the rest keep each row's best score
            for (int64_t l = 0; l < n_layer_kv; ++l) {
                for (int64_t g = 0; g < n_kv; ++g) {
                    for (int64_t i = 0; i < n_prefix; ++i) {
                        float & best = seq.probe_max[seq.side(l, out.cells[i], g)];
                        best = std::max(best, out.score[(l * n_kv + g) * n_prefix + i]);
                    }
                }
            }
        }
        seq.probed = true;
        return 0;
    }
    rescale_scores(pol, n_layer_kv, n_kv, protect, out);
    return 0;
}

int32_t score_sequence(llama_kv_evict_state & st, llama_seq_id seq_id, bool need_norms, bool commit, seq_scores & out,
        llama_pos probe_end) {
    // DefensiveKV's scores are weighed by the norms: computed whether or not the caller asks for them
    need_norms = need_norms || (probe_end < 0 && st.policy().weigh == rescale::norm_share);
    if (int32_t err = score_cells(st, seq_id, need_norms, commit, out, probe_end)) {
        return err;
    }
    return probe_end < 0 ? guard_given(st, seq_id, out) : 0;
}

} // namespace kv_evict
