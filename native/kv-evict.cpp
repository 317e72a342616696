// Public C API of the eviction hook (declared in llama.h by the patch) and the query capture.
#include "llama-kv-evict-hook.h"
#include "kv-evict-state.h"
#include "kv-evict-select.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include <algorithm>
#include <map>
#include <set>
#include <memory>

namespace kv_evict {

static thread_local std::string g_last_error;

int32_t set_error(int32_t code, const std::string & msg) {
    g_last_error = msg;
    return code;
}

namespace {

// Writes the positions of the captured queries' slots at every decode. One per layer: each is a few integers.
class graph_input_capture : public llm_graph_input_i {
public:
    graph_input_capture(llama_kv_evict_state * st, int64_t n_tokens, int64_t n_capture)
        : st(st), n_tokens(n_tokens), n_capture(n_capture) {}

    void set_input(const llama_ubatch * ubatch) override {
        std::vector<int64_t> idx(n_capture);
        for (int64_t t = 0; t < n_capture; ++t) {
            const llama_pos pos = ubatch->pos[n_tokens - n_capture + t];
            idx[t] = st->slot(pos);
            st->slot_pos[idx[t]] = pos;
        }
        for (uint32_t t = 0; t < ubatch->n_tokens; ++t) {
            st->min_written = std::min(st->min_written, ubatch->pos[t]);
        }
        ggml_backend_tensor_set(slots, idx.data(), 0, ggml_nbytes(slots));
    }

    bool can_reuse(const llm_graph_params & params) override {
        return params.ubatch.n_tokens == n_tokens && params.cparams.kv_evict == st;
    }

    ggml_tensor * slots = nullptr; // I64 [n_capture]

private:
    llama_kv_evict_state * st;
    const int64_t n_tokens;
    const int64_t n_capture;
};

llama_kv_cache * full_attention_cache(llama_memory_i * mem) {
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    return dynamic_cast<llama_kv_cache *>(mem);
}

std::string validate(const llama_kv_evict_params & p, uint32_t kv_size) {
    if (p.window < 1) {
        return "window must be at least 1 (got " + std::to_string(p.window) + ")";
    }
    if (p.budget <= p.window) {
        return "budget (" + std::to_string(p.budget) + ") must be larger than window (" + std::to_string(p.window) +
               "): the window's cells are always kept; raise the budget or lower the window";
    }
    if ((uint32_t) p.budget > kv_size) {
        return "budget (" + std::to_string(p.budget) + ") exceeds the cache size (" + std::to_string(kv_size) +
               " cells): the cache would fill before anything is evicted; create the context with n_ctx >= budget + n_batch";
    }
    if (p.policy < LLAMA_KV_EVICT_POLICY_CRITICALKV || p.policy > LLAMA_KV_EVICT_POLICY_STREAMING) {
        return "unknown policy " + std::to_string((int) p.policy);
    }
    if (p.granularity != LLAMA_KV_EVICT_GRANULARITY_TOKEN && p.granularity != LLAMA_KV_EVICT_GRANULARITY_HEAD) {
        return "unknown granularity " + std::to_string((int) p.granularity);
    }
    if (p.pool_kernel < 1 || p.pool_kernel % 2 == 0) {
        return "pool_kernel must be odd and at least 1 (got " + std::to_string(p.pool_kernel) + ")";
    }
    if (!(p.first_stage_ratio >= 0.0f && p.first_stage_ratio <= 1.0f)) {
        return "first_stage_ratio must lie in [0, 1]";
    }
    if (!(p.epsilon >= 0.0f)) {
        return "epsilon must be >= 0";
    }
    if (p.n_sink < 0 || p.n_sink + p.window > p.budget) {
        return "n_sink must be >= 0 and n_sink + window <= budget";
    }
    return "";
}

// Which model properties the scoring graph does not reproduce: refuse rather than score the wrong attention
std::string unsupported(const llama_context & lctx, llama_kv_cache * kv) {
    const llama_model   & model   = lctx.get_model();
    const llama_hparams & hp      = model.hparams;
    if (!kv) {
        return std::string("the model's memory is not a plain or sliding-window KV cache (architecture ") +
               llm_arch_name(model.arch) + ": recurrent and hybrid models cannot be evicted)";
    }
    if (hp.is_mla()) {
        return std::string("architecture ") + llm_arch_name(model.arch) + " uses multi-head latent attention, which the hook cannot score";
    }
    if (hp.attn_soft_cap || hp.f_max_alibi_bias != 0.0f || model.arch == LLM_ARCH_GROK) {
        return std::string("architecture ") + llm_arch_name(model.arch) + " uses attention soft-capping or ALiBi, which the hook does not score yet";
    }
    if (lctx.get_cparams().n_seq_max != 1) {
        return "eviction supports one sequence per context (n_seq_max = 1)";
    }
    for (uint32_t il : kv->get_layer_ids()) {
        if (!model.layers[il].wo) {
            return "layer " + std::to_string(il) + " has no attention output projection (wo)";
        }
        if (hp.n_head(il) % hp.n_head_kv(il) != 0 || hp.n_head_kv(il) != hp.n_head_kv(kv->get_layer_ids()[0])) {
            return "layers with differing KV head counts are not supported";
        }
    }
    return "";
}

// Token granularity: one score per cell, the mean over layers and KV heads. Attention shares sum to one per head, so
// every head votes with equal weight; the CriticalKV second-stage products are normalised per head for the same reason
// (value norms differ by orders of magnitude between layers, and one layer would otherwise decide alone).
std::vector<uint8_t> select_token(const llama_kv_evict_params & p, const seq_scores & sc, int64_t n_layer_kv, int64_t n_kv) {
    const int64_t n_prefix = sc.n_prefix();
    const int64_t budget   = p.budget - sc.n_window;

    if (p.policy == LLAMA_KV_EVICT_POLICY_STREAMING) {
        std::vector<uint8_t> keep(n_prefix, 0);
        const int64_t n_sink = std::min<int64_t>(p.n_sink, budget);
        for (int64_t i = 0; i < n_prefix; ++i) {
            keep[i] = i < n_sink || i >= n_prefix - (budget - n_sink);
        }
        return keep;
    }

    const int64_t n_heads = n_layer_kv * n_kv;
    std::vector<float> s(n_prefix, 0.0f);
    for (int64_t hh = 0; hh < n_heads; ++hh) {
        for (int64_t i = 0; i < n_prefix; ++i) {
            s[i] += sc.score[hh * n_prefix + i] / n_heads;
        }
    }
    if (p.policy != LLAMA_KV_EVICT_POLICY_CRITICALKV) {
        return select_top(s, budget);
    }

    std::vector<float> c(n_prefix, 0.0f);
    std::vector<double> ch(n_prefix);
    for (int64_t hh = 0; hh < n_heads; ++hh) {
        double total = 0.0;
        for (int64_t i = 0; i < n_prefix; ++i) {
            ch[i] = ((double) sc.score[hh * n_prefix + i] + p.epsilon) * sc.value_norm[hh * n_prefix + i];
            total += ch[i];
        }
        for (int64_t i = 0; i < n_prefix; ++i) {
            c[i] += (float) (total > 0.0 ? ch[i] / total / n_heads : 0.0);
        }
    }
    return select_two_stage(s, c, budget, p.first_stage_ratio);
}

// Token granularity: the cells select_token drops leave the full-attention cache. Only that cache: an iSWA model's
// sliding-window cache keeps its window as llama.cpp manages it
int32_t evict_tokens(llama_kv_evict_state & st, llama_seq_id seq_id, const seq_scores & sc, int64_t n_layer_kv, int64_t n_kv) {
    const std::vector<uint8_t> keep = select_token(st.params, sc, n_layer_kv, n_kv);

    // runs of evicted positions: seq_rm scans every cell, so one call per run rather than per cell
    int32_t n_removed = 0;
    for (int64_t i = 0; i < sc.n_prefix();) {
        if (keep[i]) {
            ++i;
            continue;
        }
        int64_t j = i;
        while (j < sc.n_prefix() && !keep[j]) {
            ++j;
        }
        if (!st.kv->seq_rm(seq_id, sc.pos[i], sc.pos[j - 1] + 1)) {
            return set_error(ERR_COMPUTE, "the cache refused to remove positions " + std::to_string(sc.pos[i]) + ".." + std::to_string(sc.pos[j - 1]));
        }
        n_removed += j - i;
        i = j;
    }
    return n_removed;
}

// Head granularity: each (layer, KV head) keeps its own best cells by the policy's per-head rule; their rows are
// compacted into the sequence's first cells (kv-evict-compact.cpp) and the remaining prefix cells are freed.
int32_t evict_heads(llama_kv_evict_state & st, llama_seq_id seq_id, const seq_scores & sc, int64_t n_layer_kv, int64_t n_kv) {
    const auto & p = st.params;
    const int64_t n_prefix = sc.n_prefix();
    const int64_t budget   = p.budget - sc.n_window;
    const uint32_t kv_size = st.kv->get_size();
    if (n_prefix <= budget) {
        return 0;
    }

    std::vector<std::vector<uint32_t>> src(n_layer_kv * n_kv);
    for (int64_t hh = 0; hh < n_layer_kv * n_kv; ++hh) {
        std::vector<float> s(sc.score.begin() + hh * n_prefix, sc.score.begin() + (hh + 1) * n_prefix);
        std::vector<uint8_t> keep;
        if (p.policy == LLAMA_KV_EVICT_POLICY_CRITICALKV) {
            std::vector<float> c(n_prefix);
            for (int64_t i = 0; i < n_prefix; ++i) {
                c[i] = (s[i] + p.epsilon) * sc.value_norm[hh * n_prefix + i];
            }
            keep = select_two_stage(s, c, budget, p.first_stage_ratio);
        } else {
            keep = select_top(s, budget);
        }
        for (int64_t i = 0; i < n_prefix; ++i) {
            if (keep[i]) {
                src[hh].push_back(sc.cells[i]);
            }
        }
    }
    const std::vector<uint32_t> dst(sc.cells.begin(), sc.cells.begin() + budget);
    if (int32_t err = compact_heads(st, st.kv->get_stream(seq_id), dst, src)) {
        return err;
    }

    // side data moves with the rows
    std::vector<float>     norm(budget), acc(budget);
    std::vector<llama_pos> hpos(budget);
    for (int64_t l = 0; l < n_layer_kv; ++l) {
        for (int64_t g = 0; g < n_kv; ++g) {
            auto at = [&](uint32_t cell) { return (l * kv_size + cell) * n_kv + g; };
            for (int64_t j = 0; j < budget; ++j) {
                norm[j] = st.value_norm[at(src[l * n_kv + g][j])];
                acc[j]  = st.h2o_acc[at(src[l * n_kv + g][j])];
                hpos[j] = st.head_pos[at(src[l * n_kv + g][j])];
            }
            for (int64_t j = 0; j < budget; ++j) {
                st.value_norm[at(dst[j])] = norm[j];
                st.h2o_acc[at(dst[j])]    = acc[j];
                st.head_pos[at(dst[j])]   = hpos[j];
            }
        }
    }
    for (uint32_t cell : dst) {
        // criticalkv computed every prefix cell's norms; other policies did not, and recompute them from the rows
        st.norm_valid[cell] = p.policy == LLAMA_KV_EVICT_POLICY_CRITICALKV;
    }

    // the destination cells are the first `budget` prefix positions: the rest of the prefix is one position range
    if (!st.kv->seq_rm(seq_id, sc.pos[budget], sc.pos[n_prefix])) {
        return set_error(ERR_COMPUTE, "the cache refused to remove the compacted prefix");
    }
    return (int32_t) (n_prefix - budget);
}

// Index of model layer il among the cache's layers, or an error code
int32_t layer_index(llama_kv_cache & kv, int32_t il) {
    const auto layer_ids = kv.get_layer_ids();
    const auto it = std::find(layer_ids.begin(), layer_ids.end(), (uint32_t) il);
    if (it == layer_ids.end()) {
        return set_error(ERR_INVALID, "layer " + std::to_string(il) + " is not a layer of the evicted (full-attention) cache");
    }
    return (int32_t) (it - layer_ids.begin());
}

llama_kv_evict_state * enabled_state(llama_context * ctx) {
    return ctx ? ctx->get_cparams().kv_evict : nullptr;
}

int32_t check_seq_id(const llama_context * ctx, llama_seq_id seq_id) {
    if (seq_id < 0 || (uint32_t) seq_id >= ctx->get_cparams().n_seq_max) {
        return set_error(ERR_INVALID, "sequence id " + std::to_string(seq_id) + " is out of range");
    }
    return 0;
}

int32_t check_seq(llama_kv_evict_state * st, llama_seq_id seq_id) {
    if (!st) {
        return set_error(ERR_DISABLED, "eviction is not enabled on this context: call llama_kv_evict_enable first");
    }
    return check_seq_id(st->lctx, seq_id);
}

// The cache of seq_id whether or not eviction is enabled (read-only queries)
int32_t seq_cache(llama_context * ctx, llama_seq_id seq_id, llama_kv_cache *& kv) {
    if (!ctx) {
        return set_error(ERR_INVALID, "ctx must not be NULL");
    }
    kv = full_attention_cache(ctx->get_memory());
    if (!kv) {
        return set_error(ERR_UNSUPPORTED, "the context's memory is not a KV cache");
    }
    return check_seq_id(ctx, seq_id);
}

// The enabled state and the index of layer il among the evicted cache's layers, or an error code
int32_t enabled_layer(llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_kv_evict_state *& st) {
    st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    return layer_index(*st->kv, il);
}

} // namespace
} // namespace kv_evict

using namespace kv_evict;

void llama_kv_evict_capture(llama_kv_evict_state * st, ggml_context * ctx0, ggml_cgraph * gf, llm_graph_result * res,
        ggml_tensor * q_cur, float kq_scale, int il) {
    if (il < 0 || (size_t) il >= st->ring.size() || !st->ring[il]) {
        return;
    }
    st->kq_scale[il] = kq_scale;

    const int64_t n_tokens  = q_cur->ne[2];
    const int64_t n_capture = std::min<int64_t>(n_tokens, st->params.window);

    auto inp = std::make_unique<graph_input_capture>(st, n_tokens, n_capture);
    inp->slots = ggml_new_tensor_1d(ctx0, GGML_TYPE_I64, n_capture);
    ggml_set_input(inp->slots);

    ggml_tensor * q = ggml_is_contiguous(q_cur) ? q_cur : ggml_cont(ctx0, q_cur);
    if (q->type != GGML_TYPE_F32) {
        q = ggml_cast(ctx0, q, GGML_TYPE_F32);
    }
    q = ggml_reshape_2d(ctx0, q, q->ne[0] * q->ne[1], n_tokens);
    q = ggml_view_2d(ctx0, q, q->ne[0], n_capture, q->nb[1], (n_tokens - n_capture) * q->nb[1]);
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, st->ring[il], q, inp->slots));

    res->add_input(std::move(inp));
}

void llama_kv_evict_state_free(llama_kv_evict_state * st) {
    delete st;
}

llama_kv_evict_params llama_kv_evict_default_params(void) {
    llama_kv_evict_params p{};
    p.policy            = LLAMA_KV_EVICT_POLICY_CRITICALKV;
    p.granularity       = LLAMA_KV_EVICT_GRANULARITY_TOKEN;
    p.budget            = 1024;
    p.window            = 32;   // the CriticalKV authors' observation window
    p.pool_kernel       = 5;    // SnapKV / kvpress
    p.first_stage_ratio = 0.5f; // CriticalKV default
    p.epsilon           = 1e-4f;
    p.n_sink            = 4;    // StreamingLLM's attention sinks
    return p;
}

int32_t llama_kv_evict_enable(llama_context * ctx, const llama_kv_evict_params * params) {
    if (!ctx || !params) {
        return set_error(ERR_INVALID, "ctx and params must not be NULL");
    }
    llama_kv_cache * kv = full_attention_cache(ctx->get_memory());
    std::string why = unsupported(*ctx, kv);
    if (!why.empty()) {
        return set_error(ERR_UNSUPPORTED, why);
    }
    why = validate(*params, kv->get_size());
    if (!why.empty()) {
        return set_error(ERR_INVALID, why);
    }
    if (params->granularity == LLAMA_KV_EVICT_GRANULARITY_HEAD) {
        why = head_granularity_unsupported(*kv);
        if (!why.empty()) {
            return set_error(ERR_UNSUPPORTED, why);
        }
    }

    const llama_model & model = ctx->get_model();
    const auto & hp = model.hparams;
    const auto layer_ids = kv->get_layer_ids();

    auto st = std::make_unique<llama_kv_evict_state>();
    st->lctx   = ctx;
    st->kv     = kv;
    st->params = *params;
    st->ring.assign(hp.n_layer(), nullptr);
    st->kq_scale.assign(hp.n_layer(), 1.0f);
    st->slot_pos.assign(params->window, -1);

    // one ring tensor per layer, in the buffer type of that layer's K cache (the same device as the cache)
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_of;
    for (uint32_t il : layer_ids) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(kv->get_k_storage(il)->buffer);
        if (!ctx_of.count(buft)) {
            ggml_init_params ip = { ggml_tensor_overhead() * hp.n_layer(), nullptr, true };
            st->ring_ctxs.emplace_back(ggml_init(ip));
            ctx_of[buft] = st->ring_ctxs.back().get();
        }
        st->ring[il] = ggml_new_tensor_2d(ctx_of[buft], GGML_TYPE_F32, hp.n_embd_head_k(il) * hp.n_head(il), params->window);
        ggml_format_name(st->ring[il], "kv_evict_q_l%u", il);
    }
    for (auto & [buft, c] : ctx_of) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(c, buft);
        if (!buf) {
            return set_error(ERR_COMPUTE, "cannot allocate the query ring");
        }
        ggml_backend_buffer_clear(buf, 0);
        st->ring_bufs.emplace_back(buf);
    }

    const size_t side = (size_t) layer_ids.size() * kv->get_size() * hp.n_head_kv(layer_ids[0]);
    st->value_norm.assign(side, 0.0f);
    st->h2o_acc.assign(side, 0.0f);
    st->head_pos.assign(side, -1);
    st->side_pos.assign(kv->get_size(), -1);
    st->norm_valid.assign(kv->get_size(), 0);

    ctx->set_kv_evict(st.release());
    g_last_error.clear();
    return 0;
}

void llama_kv_evict_disable(llama_context * ctx) {
    if (ctx && ctx->get_cparams().kv_evict) {
        ctx->set_kv_evict(nullptr);
    }
}

int32_t llama_kv_evict(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    const int64_t t_start = ggml_time_us();
    ctx->synchronize();

    const auto & cells = st->kv->get_cells(seq_id);
    if ((int64_t) cells.seq_pos_get(seq_id).size() <= st->params.budget) {
        return 0;
    }

    const auto & hp = ctx->get_model().hparams;
    const int64_t n_layer_kv = st->kv->get_layer_ids().size();
    const int64_t n_kv       = hp.n_head_kv(st->kv->get_layer_ids()[0]);

    seq_scores sc;
    const bool need_norms = st->params.policy == LLAMA_KV_EVICT_POLICY_CRITICALKV;
    if (int32_t err = score_sequence(*st, seq_id, need_norms, /*commit=*/true, sc)) {
        return err;
    }
    const bool head_wise = st->params.granularity == LLAMA_KV_EVICT_GRANULARITY_HEAD &&
                           st->params.policy != LLAMA_KV_EVICT_POLICY_STREAMING; // streaming keeps the same cells in every head
    const int32_t n_removed = head_wise ? evict_heads(*st, seq_id, sc, n_layer_kv, n_kv)
                                        : evict_tokens(*st, seq_id, sc, n_layer_kv, n_kv);
    if (n_removed < 0) {
        return n_removed;
    }
    st->n_evictions += n_removed > 0;
    st->n_evicted   += n_removed;
    st->t_evict_us  += ggml_time_us() - t_start;
    return n_removed;
}

int32_t llama_kv_evict_scores(llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_pos * pos, float * score,
        float * value_norm, int32_t n_max) {
    llama_kv_evict_state * st = nullptr;
    const int32_t l = enabled_layer(ctx, seq_id, il, st);
    if (l < 0) {
        return l;
    }
    ctx->synchronize();

    seq_scores sc;
    if (int32_t err = score_sequence(*st, seq_id, value_norm != nullptr, /*commit=*/false, sc)) {
        return err;
    }
    const int64_t n    = sc.n_prefix();
    const int64_t n_kv = ctx->get_model().hparams.n_head_kv(il);
    const int64_t m    = std::min<int64_t>(n, n_max);
    for (int64_t i = 0; i < m; ++i) {
        if (pos) {
            pos[i] = sc.pos[i];
        }
        for (int64_t gk = 0; gk < n_kv; ++gk) {
            if (score && !sc.score.empty()) {
                score[gk * m + i] = sc.score[(l * n_kv + gk) * n + i];
            }
            if (value_norm) {
                value_norm[gk * m + i] = sc.value_norm[(l * n_kv + gk) * n + i];
            }
        }
    }
    return (int32_t) n;
}

int32_t llama_kv_evict_compact_positions(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    llama_memory_t mem = ctx->get_memory();
    if (!llama_memory_can_shift(mem)) {
        return set_error(ERR_UNSUPPORTED, "this model's cache cannot shift positions (no RoPE shift), so they cannot be compacted");
    }
    ctx->synchronize();

    // the numbering covers an iSWA model's sliding-window cache too, which may hold positions evicted from the
    // full-attention cache: both caches must keep one order
    std::set<llama_pos> held;
    for (const auto & pc : st->kv->get_cells(seq_id).seq_pos_get(seq_id)) {
        held.insert(pc.first);
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        for (const auto & pc : iswa->get_swa()->get_cells(seq_id).seq_pos_get(seq_id)) {
            held.insert(pc.first);
        }
    }
    std::map<llama_pos, llama_pos> new_pos;
    for (llama_pos p : held) {
        new_pos.emplace(p, (llama_pos) new_pos.size());
    }
    // one seq_add per run of cells that move by the same amount; runs move down in ascending order, so a moved run
    // never lands in the range of one still to move
    for (auto it = new_pos.begin(); it != new_pos.end();) {
        const llama_pos delta = it->second - it->first;
        auto end = it;
        while (end != new_pos.end() && end->second - end->first == delta) {
            ++end;
        }
        if (delta != 0) {
            llama_memory_seq_add(mem, seq_id, it->first, std::prev(end)->first + 1, delta);
        }
        it = end;
    }

    // side data follows its cell; the window's queries moved with the last run, so offsetting the ring's slot
    // numbering by that run's shift keeps them readable (older captured queries are dropped: they are never read)
    auto moved = [&](llama_pos p) {
        const auto it = new_pos.find(p);
        return it == new_pos.end() ? -1 : it->second;
    };
    for (llama_pos & p : st->side_pos) {
        if (p >= 0) {
            p = moved(p);
        }
    }
    for (llama_pos & p : st->head_pos) {
        if (p >= 0) {
            p = moved(p);  // a head's token whose own cell was freed by head-wise compaction has no number any more
        }
    }
    if (!new_pos.empty()) {
        const llama_pos delta_last = new_pos.rbegin()->second - new_pos.rbegin()->first;
        for (llama_pos & p : st->slot_pos) {
            const llama_pos q = p >= 0 ? moved(p) : -1;
            p = q >= 0 && q - p == delta_last ? q : -1;
        }
        st->slot_offset = ((st->slot_offset - delta_last) % st->params.window + st->params.window) % st->params.window;
        st->min_written = std::min<llama_pos>(st->min_written + delta_last, new_pos.size());
        st->h2o_last    = st->h2o_last < 0 ? -1 : st->h2o_last + delta_last;
    }
    return (int32_t) new_pos.size();
}

int32_t llama_kv_evict_positions(llama_context * ctx, llama_seq_id seq_id, llama_pos * pos, int32_t n_max) {
    llama_kv_cache * kv = nullptr;
    if (int32_t err = seq_cache(ctx, seq_id, kv)) {
        return err;
    }
    int32_t n = 0;
    for (const auto & pc : kv->get_cells(seq_id).seq_pos_get(seq_id)) {
        if (pos && n < n_max) {
            pos[n] = pc.first;
        }
        ++n;
    }
    return n;
}

int32_t llama_kv_evict_head_positions(llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_pos * out, int32_t n_max) {
    llama_kv_evict_state * st = nullptr;
    const int32_t l = enabled_layer(ctx, seq_id, il, st);
    if (l < 0) {
        return l;
    }
    const int64_t n_kv = ctx->get_model().hparams.n_head_kv(il);
    const uint32_t kv_size = st->kv->get_size();
    const auto & pcs = st->kv->get_cells(seq_id).seq_pos_get(seq_id);
    const int64_t n = pcs.size();
    const int64_t m = std::min<int64_t>(n, n_max);
    int64_t i = 0;
    for (const auto & [pos, cell] : pcs) {
        if (i >= m) {
            break;
        }
        // a cell decoded since the last scoring holds its own token in every head
        const bool fresh = st->holds_new_token(cell, pos);
        for (int64_t g = 0; g < n_kv; ++g) {
            out[g * m + i] = fresh ? pos : st->head_pos[(l * kv_size + cell) * n_kv + g];
        }
        ++i;
    }
    return (int32_t) n;
}

int64_t llama_kv_evict_read_rows(llama_context * ctx, llama_seq_id seq_id, int32_t il, bool is_v, void * out, size_t size) {
    llama_kv_cache * kv = nullptr;
    if (int32_t err = seq_cache(ctx, seq_id, kv)) {
        return err;
    }
    if (int32_t err = layer_index(*kv, il); err < 0) {
        return err;
    }
    ctx->synchronize();
    ggml_tensor * t = is_v ? kv->get_v_storage(il) : kv->get_k_storage(il);
    const bool transposed = is_v && kv->get_v_trans();
    const uint32_t stream = kv->get_stream(seq_id);
    const size_t row = ggml_row_size(t->type, t->ne[0]);
    const auto & pcs = kv->get_cells(seq_id).seq_pos_get(seq_id);
    const int64_t need = (int64_t) (pcs.size() * row);
    if (!out || size < (size_t) need) {
        return need;
    }
    uint8_t * dst = (uint8_t *) out;
    for (const auto & pc : pcs) {
        const size_t cell = pc.second;
        if (!transposed) {
            ggml_backend_tensor_get(t, dst, stream * t->nb[2] + cell * t->nb[1], row);
        } else {
            // debug only: one element at a time (element (cell, dim j) is at cell + j*kv_size)
            const size_t es = ggml_type_size(t->type);
            for (int64_t j = 0; j < t->ne[0]; ++j) {
                ggml_backend_tensor_get(t, dst + j * es, stream * t->nb[2] + (cell + j * t->ne[1]) * es, es);
            }
        }
        dst += row;
    }
    return need;
}

int32_t llama_kv_evict_get_stats(llama_context * ctx, llama_seq_id seq_id, llama_kv_evict_stats * stats) {
    llama_kv_cache * kv = nullptr;
    if (!stats) {
        return set_error(ERR_INVALID, "stats must not be NULL");
    }
    if (int32_t err = seq_cache(ctx, seq_id, kv)) {
        return err;
    }
    *stats = {};
    const auto & cells   = kv->get_cells(seq_id);
    stats->n_cells_used  = cells.get_used();
    stats->n_seq_cells   = cells.seq_pos_get(seq_id).size();
    stats->kv_size       = kv->get_size();
    for (const auto & [buft, size] : ctx->get_memory()->memory_breakdown()) {
        stats->kv_bytes += size;
    }
    if (const llama_kv_evict_state * st = ctx->get_cparams().kv_evict) {
        stats->n_evictions = st->n_evictions;
        stats->n_evicted   = st->n_evicted;
        stats->t_evict_us  = st->t_evict_us;
    }
    return 0;
}

const char * llama_kv_evict_last_error(void) {
    return g_last_error.c_str();
}
