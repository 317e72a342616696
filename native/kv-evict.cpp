// Public C API of the eviction hook (declared in llama.h by the patch): enabling, evicting, the scores, the counters;
// and the checks every entry point shares.
#include "kv-evict-state.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>

namespace kv_evict {

static thread_local std::string g_last_error;

int32_t set_error(int32_t code, const std::string & msg) {
    g_last_error = msg;
    return code;
}

llama_kv_cache * full_attention_cache(llama_memory_i * mem) {
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    return dynamic_cast<llama_kv_cache *>(mem);
}

namespace {

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
    // the enums as the caller's bytes: a value outside an enum's range may not be loaded as the enum
    int32_t policy_id, granularity;
    static_assert(sizeof(p.policy) == sizeof(policy_id) && sizeof(p.granularity) == sizeof(granularity), "int-sized enums");
    memcpy(&policy_id, &p.policy, sizeof(policy_id));
    memcpy(&granularity, &p.granularity, sizeof(granularity));
    const policy * pol = find_policy(policy_id);
    if (!pol) {
        return "unknown policy " + std::to_string(policy_id);
    }
    if (granularity != LLAMA_KV_EVICT_GRANULARITY_TOKEN && granularity != LLAMA_KV_EVICT_GRANULARITY_HEAD) {
        return "unknown granularity " + std::to_string(granularity);
    }
    if (pol->shares_heads() && p.granularity != LLAMA_KV_EVICT_GRANULARITY_HEAD) {
        return std::string(pol->name) + " gives each KV head its own share of cells (" + name(pol->share) +
               " allocation): use granularity head, or with granularity token a policy of uniform allocation "
               "(such as criticalkv)";
    }
    if (!(p.ada_alpha >= 0.0f && p.ada_alpha <= 1.0f)) {
        return "ada_alpha must lie in [0, 1]";
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
    if (kv->get_n_stream() != lctx.get_cparams().n_seq_max) {
        // compaction moves a sequence's rows within its own cells
        return "several sequences share one cache (kv_unified = true): eviction needs a stream of cells per sequence, "
               "create the context with kv_unified = false (llama.cpp's default)";
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

} // namespace

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

void settle(llama_context * ctx) {
    ctx->synchronize();
    ctx->memory_update(false);
}

// The enabled state and the index of layer il among the evicted cache's layers, or an error code
int32_t enabled_layer(llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_kv_evict_state *& st) {
    st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    return layer_index(*st->kv, il);
}

} // namespace kv_evict

using namespace kv_evict;

llama_kv_evict_params llama_kv_evict_default_params(void) {
    llama_kv_evict_params p{};
    p.policy            = LLAMA_KV_EVICT_POLICY_DEFENSIVEKV_LAYER; // keeps a document's facts for a later question (docs/results.md)
    p.granularity       = LLAMA_KV_EVICT_GRANULARITY_HEAD; // the paper's: every head keeps the cells it needs
    p.budget            = 1024;
    p.window            = 32;   // the CriticalKV authors' observation window
    p.pool_kernel       = 13;   // SnapKV's and kvpress's 5 (and 9) cut a key written one token per digit (docs/bench)
    p.first_stage_ratio = 0.5f; // CriticalKV default
    p.epsilon           = 1e-4f;
    p.n_sink            = 4;    // StreamingLLM's attention sinks
    p.ada_alpha         = 0.2f; // AdaKV's safeguard
    return p;
}

int32_t llama_kv_evict_policy_describe(int32_t p, llama_kv_evict_policy_info * info) {
    int32_t n = 0;
    policies(n);
    const policy * pol = find_policy(p);
    if (!pol) {
        return set_error(ERR_INVALID, "unknown policy " + std::to_string(p) + " (there are " + std::to_string(n) + ")");
    }
    if (info) {
        *info = {pol->name, name(pol->score), name(pol->weigh), name(pol->share), pol->shares_heads(), pol->given_share};
    }
    return n;
}

int32_t llama_kv_evict_validate(const llama_kv_evict_params * params) {
    if (!params) {
        return set_error(ERR_INVALID, "params must not be NULL");
    }
    // the cache's size is checked when the hook is enabled on a context
    const std::string why = validate(*params, UINT32_MAX);
    return why.empty() ? 0 : set_error(ERR_INVALID, why);
}

int32_t llama_kv_evict_max_cells(const llama_kv_evict_params * params) {
    if (int32_t err = llama_kv_evict_validate(params)) {
        return err;
    }
    const int32_t head_budget = params->budget - params->window;
    return params->window + (find_policy(params->policy)->shares_heads() ? (int32_t) head_share_cap(head_budget) : head_budget);
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
        why = head_granularity_unsupported(*kv, ctx->get_model().hparams);
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
    st->n_head_kv = hp.n_head_kv(layer_ids[0]);
    const uint32_t n_seq = ctx->get_cparams().n_seq_max;
    for (uint32_t s = 0; s < n_seq; ++s) {
        st->seqs.emplace_back(params->window, params->window * s, kv->get_size(), st->n_head_kv, layer_ids.size());
    }

    // one ring tensor per layer, in the buffer type of that layer's K cache (the same device as the cache)
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_of;
    for (uint32_t il : layer_ids) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(kv->get_k_storage(il)->buffer);
        if (!ctx_of.count(buft)) {
            ggml_init_params ip = { ggml_tensor_overhead() * hp.n_layer(), nullptr, true };
            st->ring_ctxs.emplace_back(ggml_init(ip));
            ctx_of[buft] = st->ring_ctxs.back().get();
        }
        st->ring[il] = ggml_new_tensor_2d(ctx_of[buft], GGML_TYPE_F32, hp.n_embd_head_k(il) * hp.n_head(il),
                                          st->discard_row() + 1);
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

    if (llama_kv_evict_state * old = ctx->get_cparams().kv_evict) {
        drop_absent_cells(*old);
    }
    kv->kv_evict = st.get();
    ctx->set_kv_evict(st.release());
    g_last_error.clear();
    return 0;
}

void llama_kv_evict_disable(llama_context * ctx) {
    if (ctx && ctx->get_cparams().kv_evict) {
        drop_absent_cells(*ctx->get_cparams().kv_evict);
        ctx->set_kv_evict(nullptr);
    }
}

int32_t llama_kv_evict(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    const int64_t t_start = ggml_time_us();
    settle(ctx);
    const int64_t t_settled = ggml_time_us();

    kv_evict_seq & seq = st->seqs[seq_id];
    if (held_cells(*st, seq_id) <= st->params.budget) {
        seq.end_probes(); // a probe scores the cells of one eviction
        return 0;
    }
    seq.t_phase_us[EVICT_PHASE_SETTLE] += t_settled - t_start;

    const auto & hp = ctx->get_model().hparams;
    const int64_t n_layer_kv = st->kv->get_layer_ids().size();
    const int64_t n_kv       = hp.n_head_kv(st->kv->get_layer_ids()[0]);

    seq_scores sc;
    const bool need_norms = st->policy().needs_value_norms();
    const int64_t norms_before = seq.t_phase_us[EVICT_PHASE_NORMS];
    if (int32_t err = score_sequence(*st, seq_id, need_norms, /*commit=*/true, sc)) {
        return err;
    }
    seq.t_phase_us[EVICT_PHASE_SCORE] += ggml_time_us() - t_settled - (seq.t_phase_us[EVICT_PHASE_NORMS] - norms_before);
    const bool head_wise = st->params.granularity == LLAMA_KV_EVICT_GRANULARITY_HEAD && !st->policy().same_in_every_head();
    const int32_t n_removed = head_wise ? evict_heads(*st, seq_id, sc, n_layer_kv, n_kv)
                                        : evict_tokens(*st, seq_id, sc, n_layer_kv, n_kv);
    seq.end_probes();
    if (n_removed < 0) {
        return n_removed;
    }
    seq.n_evictions += n_removed > 0;
    seq.n_evicted   += n_removed;
    seq.t_evict_us  += ggml_time_us() - t_start;
    return n_removed;
}

int32_t llama_kv_evict_probe(llama_context * ctx, llama_seq_id seq_id, llama_pos p_end) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    const scorer s = st->policy().score;
    if (s == scorer::recency || s == scorer::key_norm || s == scorer::accumulated || s == scorer::given) {
        return set_error(ERR_UNSUPPORTED, std::string("policy ") + st->policy().name + " does not rank cells by a window's "
                         "attention (scorer " + name(s) + "): a probe scores with snapkv, criticalkv, tova, defensivekv and their variants");
    }
    settle(ctx);
    const llama_pos pos_max = st->kv->seq_pos_max(seq_id);
    if (p_end < 0 || p_end > pos_max) {
        return set_error(ERR_INVALID, "p_end (" + std::to_string(p_end) + ") must lie in the sequence's positions, where "
                         "the probe starts: decode the probe after the cells it scores (positions up to " + std::to_string(pos_max) + ")");
    }
    seq_scores sc;
    return score_sequence(*st, seq_id, /*need_norms=*/false, /*commit=*/true, sc, p_end);
}

int32_t llama_kv_evict_scores(llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_pos * pos, float * score,
        float * value_norm, int32_t n_max) {
    llama_kv_evict_state * st = nullptr;
    const int32_t l = enabled_layer(ctx, seq_id, il, st);
    if (l < 0) {
        return l;
    }
    settle(ctx);

    seq_scores sc;
    if (int32_t err = score_sequence(*st, seq_id, /*need_norms=*/value_norm != nullptr, /*commit=*/false, sc)) {
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
        stats->n_evictions = st->seqs[seq_id].n_evictions;
        stats->n_evicted   = st->seqs[seq_id].n_evicted;
        stats->t_evict_us  = st->seqs[seq_id].t_evict_us;
        stats->value_norm_kernel  = st->value_norm_kernel;
        stats->window_attn_kernel = st->window_attn_kernel;
        stats->compact_kernel     = st->compact_kernel;
        stats->scoring_bytes      = st->scoring_bytes;
    }
    return 0;
}

const char * llama_kv_evict_last_error(void) {
    return g_last_error.c_str();
}
