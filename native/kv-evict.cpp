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
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>
#include <tuple>
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

// The -ada policies' per-head mask of layer l: -inf where a KV head holds no token in the cell, for each query head,
// added to llama.cpp's own mask (llama.cpp's mask is one per cell, shared by the heads)
class graph_input_head_mask : public llm_graph_input_i {
public:
    graph_input_head_mask(llama_kv_evict_state * st, int64_t l, int64_t n_tokens) : st(st), l(l), n_tokens(n_tokens) {}

    void set_input(const llama_ubatch * ubatch) override {
        // cells this ubatch writes hold new tokens in every head, whichever input is set first
        for (uint32_t t = 0; t < ubatch->n_tokens; ++t) {
            st->min_written = std::min(st->min_written, ubatch->pos[t]);
        }
        const auto & cells = st->kv->get_cells(0);
        const int64_t n_cells = mask->ne[0];
        const int64_t n_head  = mask->ne[2];
        const int64_t group   = n_head / st->n_head_kv;
        std::vector<float> m(n_cells * n_head, 0.0f);
        for (int64_t c = 0; c < n_cells; ++c) {
            if (cells.is_empty(c)) {
                continue;
            }
            for (int64_t h = 0; h < n_head; ++h) {
                if (st->absent(l, c, cells.pos_get(c), h / group)) {
                    m[h * n_cells + c] = -INFINITY;
                }
            }
        }
        if (mask->type == GGML_TYPE_F16) {
            std::vector<ggml_fp16_t> m16(m.size());
            ggml_fp32_to_fp16_row(m.data(), m16.data(), m.size());
            ggml_backend_tensor_set(mask, m16.data(), 0, ggml_nbytes(mask));
        } else {
            ggml_backend_tensor_set(mask, m.data(), 0, ggml_nbytes(mask));
        }
    }

    bool can_reuse(const llm_graph_params & params) override {
        return params.ubatch.n_tokens == n_tokens && params.cparams.kv_evict == st;
    }

    ggml_tensor * mask = nullptr; // [n_kv cells, 1, n_head], the type of llama.cpp's mask

private:
    llama_kv_evict_state * st;
    const int64_t l;
    const int64_t n_tokens;
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
    // the enums as the caller's bytes: a value outside an enum's range may not be loaded as the enum
    int32_t policy, granularity;
    static_assert(sizeof(p.policy) == sizeof(policy) && sizeof(p.granularity) == sizeof(granularity), "int-sized enums");
    memcpy(&policy, &p.policy, sizeof(policy));
    memcpy(&granularity, &p.granularity, sizeof(granularity));
    if (policy < LLAMA_KV_EVICT_POLICY_CRITICALKV || policy > LLAMA_KV_EVICT_POLICY_DEFENSIVEKV_LAYER) {
        return "unknown policy " + std::to_string(policy);
    }
    if (granularity != LLAMA_KV_EVICT_GRANULARITY_TOKEN && granularity != LLAMA_KV_EVICT_GRANULARITY_HEAD) {
        return "unknown granularity " + std::to_string(granularity);
    }
    if (shares_heads(p.policy) && p.granularity != LLAMA_KV_EVICT_GRANULARITY_HEAD) {
        return "the -ada and defensivekv policies give each KV head its own share of cells: use granularity head";
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

// The hook's own removals: not the user's, so llama_kv_evict_on_seq_rm leaves them alone
bool edit_seq_rm(llama_kv_evict_state & st, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    st.editing = true;
    const bool ok = st.kv->seq_rm(seq_id, p0, p1);
    st.editing = false;
    return ok;
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
        if (!edit_seq_rm(st, seq_id, sc.pos[i], sc.pos[j - 1] + 1)) {
            return set_error(ERR_COMPUTE, "the cache refused to remove positions " + std::to_string(sc.pos[i]) + ".." + std::to_string(sc.pos[j - 1]));
        }
        n_removed += j - i;
        i = j;
    }
    return n_removed;
}

// Head granularity: each (layer, KV head) keeps its own best cells by the policy's per-head rule, all heads the same
// number, or with an -ada policy its AdaKV share; their rows are compacted into the sequence's first cells
// (kv-evict-compact.cpp) and the remaining prefix cells are freed. A head whose share is shorter than the cells kept
// holds no token in the last ones: the layer's attention masks them for that head (llama_kv_evict_attn).
int32_t evict_heads(llama_kv_evict_state & st, llama_seq_id seq_id, const seq_scores & sc, int64_t n_layer_kv, int64_t n_kv) {
    const auto & p = st.params;
    const int64_t n_prefix = sc.n_prefix();
    const int64_t budget   = p.budget - sc.n_window;
    const bool critical = p.policy == LLAMA_KV_EVICT_POLICY_CRITICALKV || p.policy == LLAMA_KV_EVICT_POLICY_CRITICALKV_ADA;

    std::vector<int64_t> share(n_layer_kv * n_kv, budget);
    std::vector<std::vector<uint8_t>> skip(n_layer_kv * n_kv);
    for (int64_t hh = 0; hh < n_layer_kv * n_kv; ++hh) {
        if (!sc.absent.empty()) {
            skip[hh].assign(sc.absent.begin() + hh * n_prefix, sc.absent.begin() + (hh + 1) * n_prefix);
        }
    }
    auto head_scores = [&](int64_t hh) {
        return std::vector<float>(sc.score.begin() + hh * n_prefix, sc.score.begin() + (hh + 1) * n_prefix);
    };
    if (is_defensive(p.policy)) {
        // one top-k over the pairs of every head of a layer (defensivekv) or of every layer (defensivekv-layer), with no
        // per-head floor; a head holds at most twice the per-head budget, as with AdaKV
        const int64_t n_heads = p.policy == LLAMA_KV_EVICT_POLICY_DEFENSIVEKV_LAYER ? n_layer_kv * n_kv : n_kv;
        for (int64_t h0 = 0; h0 < n_layer_kv * n_kv; h0 += n_heads) {
            std::vector<std::vector<float>>   s(n_heads);
            std::vector<std::vector<uint8_t>> taken(n_heads);
            for (int64_t h = 0; h < n_heads; ++h) {
                s[h]     = head_scores(h0 + h);
                taken[h] = skip[h0 + h].empty() ? std::vector<uint8_t>(n_prefix, 0) : skip[h0 + h];
            }
            std::vector<int64_t> sh(n_heads, 0);
            pooled_shares(s, taken, n_heads * budget, 2 * budget, sh);
            std::copy(sh.begin(), sh.end(), share.begin() + h0);
        }
    } else if (st.ada()) {
        // a head holds at most twice the per-head budget: every cell a share adds is a cell of every head and layer
        for (int64_t l = 0; l < n_layer_kv; ++l) {
            std::vector<std::vector<float>>   s(n_kv);
            std::vector<std::vector<uint8_t>> sk(n_kv);
            for (int64_t g = 0; g < n_kv; ++g) {
                s[g]  = head_scores(l * n_kv + g);
                sk[g] = skip[l * n_kv + g].empty() ? std::vector<uint8_t>(n_prefix, 0) : skip[l * n_kv + g];
            }
            const auto sh = adakv_shares(s, &sk, budget, p.ada_alpha, 2 * budget);
            std::copy(sh.begin(), sh.end(), share.begin() + l * n_kv);
        }
    }
    const int64_t n_keep = *std::max_element(share.begin(), share.end());
    if (n_prefix <= n_keep && !st.ada()) {
        return 0;
    }

    std::vector<std::vector<uint32_t>> src(n_layer_kv * n_kv);
    for (int64_t hh = 0; hh < n_layer_kv * n_kv; ++hh) {
        const std::vector<float> s = head_scores(hh);
        const std::vector<uint8_t> * sk = skip[hh].empty() ? nullptr : &skip[hh];
        std::vector<uint8_t> keep;
        if (critical) {
            std::vector<float> c(n_prefix);
            for (int64_t i = 0; i < n_prefix; ++i) {
                c[i] = (s[i] + p.epsilon) * sc.value_norm[hh * n_prefix + i];
            }
            keep = select_two_stage(s, c, share[hh], p.first_stage_ratio, sk);
        } else {
            keep = select_top(s, share[hh], sk);
        }
        for (int64_t i = 0; i < n_prefix; ++i) {
            if (keep[i]) {
                src[hh].push_back(sc.cells[i]);
            }
        }
    }
    const std::vector<uint32_t> dst(sc.cells.begin(), sc.cells.begin() + n_keep);
    if (int32_t err = compact_heads(st, st.kv->get_stream(seq_id), dst, src)) {
        return err;
    }

    // side data moves with the rows
    std::vector<float>     norm(n_keep), acc(n_keep);
    std::vector<llama_pos> hpos(n_keep);
    for (int64_t hh = 0; hh < n_layer_kv * n_kv; ++hh) {
        const int64_t l = hh / n_kv, g = hh % n_kv;
        const int64_t k = src[hh].size();
        for (int64_t j = 0; j < k; ++j) {
            norm[j] = st.value_norm[st.side(l, src[hh][j], g)];
            acc[j]  = st.h2o_acc[st.side(l, src[hh][j], g)];
            hpos[j] = st.head_pos[st.side(l, src[hh][j], g)];
        }
        for (int64_t j = 0; j < n_keep; ++j) {
            const size_t at = st.side(l, dst[j], g);
            st.value_norm[at]  = j < k ? norm[j] : 0.0f;
            st.h2o_acc[at]     = j < k ? acc[j] : 0.0f;
            st.head_pos[at]    = j < k ? hpos[j] : -1;
            st.head_absent[at] = j >= k;
            st.any_absent     |= j >= k;
        }
    }
    st.mask_saved = false;
    for (uint32_t cell : dst) {
        // the policies that weigh by value norms computed every prefix cell's; the others recompute them from the rows
        st.norm_valid[cell] = needs_value_norms(p.policy);
    }

    // the destination cells are the first n_keep prefix positions: the rest of the prefix is one position range
    if (n_keep < n_prefix && !edit_seq_rm(st, seq_id, sc.pos[n_keep], sc.pos[n_prefix])) {
        return set_error(ERR_COMPUTE, "the cache refused to remove the compacted prefix");
    }
    return (int32_t) (n_prefix - n_keep);
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

// The per-head mask lives in the hook: before the hook goes, the cells where a head holds no token leave the cache,
// or that head would attend whatever row the cell holds
void drop_absent_cells(llama_kv_evict_state & st) {
    if (!st.any_absent) {
        return;
    }
    st.lctx->synchronize();
    const int64_t n_layer_kv = st.kv->get_layer_ids().size();
    std::vector<llama_pos> drop;
    for (const auto & [pos, cell] : st.kv->get_cells(0).seq_pos_get(0)) {
        for (int64_t l = 0; l < n_layer_kv; ++l) {
            for (int64_t g = 0; g < st.n_head_kv; ++g) {
                if (st.absent(l, cell, pos, g) && (drop.empty() || drop.back() != pos)) {
                    drop.push_back(pos);
                }
            }
        }
    }
    for (llama_pos pos : drop) {
        edit_seq_rm(st, 0, pos, pos + 1);
    }
    st.any_absent = false;
}

// Cells the sequence would hold if every head kept only the cells it holds a token in: the -ada policies are within
// budget while their (head, cell) pairs are, whatever their largest share
int64_t held_cells(const llama_kv_evict_state & st, llama_seq_id seq_id) {
    const auto & pcs = st.kv->get_cells(seq_id).seq_pos_get(seq_id);
    if (!st.any_absent) {
        return pcs.size();
    }
    int64_t most = 0;
    for (int64_t l = 0; l < (int64_t) st.kv->get_layer_ids().size(); ++l) {
        int64_t pairs = 0;
        for (const auto & [pos, cell] : pcs) {
            for (int64_t g = 0; g < st.n_head_kv; ++g) {
                pairs += !st.absent(l, cell, pos, g);
            }
        }
        most = std::max(most, (pairs + st.n_head_kv - 1) / st.n_head_kv);
    }
    return most;
}

} // namespace
} // namespace kv_evict

using namespace kv_evict;

ggml_tensor * llama_kv_evict_attn(llama_kv_evict_state * st, ggml_context * ctx0, ggml_cgraph * gf, llm_graph_result * res,
        ggml_tensor * q_cur, ggml_tensor * kq_mask, float kq_scale, int il) {
    if (il < 0 || (size_t) il >= st->ring.size() || !st->ring[il]) {
        return kq_mask;
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

    if (!st->ada()) {
        return kq_mask;
    }
    const auto layer_ids = st->kv->get_layer_ids();
    const int64_t l = std::find(layer_ids.begin(), layer_ids.end(), (uint32_t) il) - layer_ids.begin();
    const int64_t n_head = q_cur->ne[1];
    auto head = std::make_unique<graph_input_head_mask>(st, l, n_tokens);
    head->mask = ggml_new_tensor_4d(ctx0, kq_mask->type, kq_mask->ne[0], 1, n_head, 1);
    ggml_set_input(head->mask);
    ggml_tensor * mask = ggml_add(ctx0, ggml_repeat_4d(ctx0, kq_mask, kq_mask->ne[0], kq_mask->ne[1], n_head, kq_mask->ne[3]), head->mask);
    res->add_input(std::move(head));
    return mask;
}

void llama_kv_evict_on_seq_rm(llama_kv_evict_state * st, int32_t seq_id, int32_t p0, int32_t p1) {
    if (st->editing || !st->kv) {
        return;
    }
    const llama_seq_id seq = seq_id < 0 ? 0 : seq_id; // one sequence per context
    // a cell goes if a head holds a moved row of a removed token in it, or of a token past the last cell (the
    // sequence continues after its last cell, and such a row's RoPE position would lie past the next queries);
    // removing cells can lower the last cell, hence the loop
    const int64_t n_layer_kv = st->kv->get_layer_ids().size();
    for (bool again = true; again;) {
        const llama_pos last = st->kv->seq_pos_max(seq);
        std::vector<llama_pos> drop;
        for (const auto & [pos, cell] : st->kv->get_cells(seq).seq_pos_get(seq)) {
            bool go = false;
            for (int64_t l = 0; l < n_layer_kv && !go; ++l) {
                for (int64_t g = 0; g < st->n_head_kv && !go; ++g) {
                    const llama_pos e = st->held_pos(l, cell, pos, g);
                    go = (e >= p0 && e < p1) || e > last;
                }
            }
            if (go) {
                drop.push_back(pos);
            }
        }
        for (llama_pos pos : drop) {
            edit_seq_rm(*st, seq, pos, pos + 1);
        }
        again = !drop.empty();
    }
}

static const char * const ADA_STATE_REFUSED = "the cache holds an -ada eviction's per-head mask, which llama.cpp's state "
                                              "leaves out: read llama_kv_evict_seq_get_data first and save it beside the "
                                              "state (pyllmkv.Llama.save_state does)";

void llama_kv_evict_on_state_write(const llama_kv_evict_state * st) {
    if (st->any_absent && !st->mask_saved) {
        set_error(ERR_UNSUPPORTED, ADA_STATE_REFUSED);
        throw std::runtime_error(ADA_STATE_REFUSED);
    }
}

void llama_kv_evict_on_state_read(llama_kv_evict_state * st) {
    // the loaded cells' rows sit at their cells' positions until llama_kv_evict_seq_set_data says otherwise; the
    // captured queries belong to what the cache held before
    std::fill(st->side_pos.begin(), st->side_pos.end(), -1);
    std::fill(st->norm_valid.begin(), st->norm_valid.end(), 0);
    std::fill(st->slot_pos.begin(), st->slot_pos.end(), -1);
    st->any_absent = false;
    st->h2o_last   = -1;
}

void llama_kv_evict_state_free(llama_kv_evict_state * st) {
    if (st && st->kv && st->kv->kv_evict == st) {
        st->kv->kv_evict = nullptr;
    }
    delete st;
}

llama_kv_evict_params llama_kv_evict_default_params(void) {
    llama_kv_evict_params p{};
    p.policy            = LLAMA_KV_EVICT_POLICY_CRITICALKV;
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

    st->kv_size   = kv->get_size();
    st->n_head_kv = hp.n_head_kv(layer_ids[0]);
    const size_t side = (size_t) layer_ids.size() * st->kv_size * st->n_head_kv;
    st->head_absent.assign(side, 0);
    st->value_norm.assign(side, 0.0f);
    st->h2o_acc.assign(side, 0.0f);
    st->head_pos.assign(side, -1);
    st->side_pos.assign(kv->get_size(), -1);
    st->norm_valid.assign(kv->get_size(), 0);

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
    ctx->synchronize();

    if (held_cells(*st, seq_id) <= st->params.budget) {
        return 0;
    }

    const auto & hp = ctx->get_model().hparams;
    const int64_t n_layer_kv = st->kv->get_layer_ids().size();
    const int64_t n_kv       = hp.n_head_kv(st->kv->get_layer_ids()[0]);

    seq_scores sc;
    const bool need_norms = needs_value_norms(st->params.policy);
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

    // the cells are numbered in order, together with an iSWA model's sliding-window cells (they may hold positions
    // evicted from the full-attention cache): seq_add moves both caches
    const int64_t n_layer_kv = st->kv->get_layer_ids().size();
    const std::vector<std::pair<llama_pos, uint32_t>> pcs(st->kv->get_cells(seq_id).seq_pos_get(seq_id).begin(),
                                                         st->kv->get_cells(seq_id).seq_pos_get(seq_id).end());
    std::set<llama_pos> numbered;
    for (const auto & pc : pcs) {
        numbered.insert(pc.first);
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        for (const auto & pc : iswa->get_swa()->get_cells(seq_id).seq_pos_get(seq_id)) {
            numbered.insert(pc.first);
        }
    }
    std::map<llama_pos, llama_pos> new_pos;
    for (llama_pos p : numbered) {
        new_pos.emplace(p, (llama_pos) new_pos.size());
    }

    // Each KV head numbers its own rows: head-wise eviction keeps different tokens per head, and one numbering of all
    // of them would leave a head's oldest token further back than the model was trained on (the tokens some head
    // holds cover most of a long stream). A head's rows keep their order and end where the cells holding new tokens
    // begin (every head holds those, at their cells' positions), so no row lies further back than the cells hold.
    // llama.cpp's K-shift turns every row with its cell; a row whose number differs turns by the difference too.
    llama_pos first_new = (llama_pos) new_pos.size();
    for (const auto & [pos, cell] : pcs) {
        if (st->holds_new_token(cell, pos)) {
            first_new = std::min(first_new, new_pos.at(pos));
        }
    }
    std::vector<std::vector<int32_t>> row_shift(n_layer_kv * st->n_head_kv);
    std::vector<std::pair<size_t, llama_pos>> numbered_rows; // (side index, number): written once every head is checked and turned
    for (int64_t l = 0; l < n_layer_kv; ++l) {
        for (int64_t g = 0; g < st->n_head_kv; ++g) {
            std::vector<std::tuple<llama_pos, uint32_t, llama_pos>> rows; // (position RoPE gave the row, cell, cell's position)
            for (const auto & [pos, cell] : pcs) {
                if (const llama_pos e = st->held_pos(l, cell, pos, g); e >= 0 && !st->holds_new_token(cell, pos)) {
                    rows.emplace_back(e, cell, pos);
                }
            }
            std::sort(rows.begin(), rows.end());
            const llama_pos first = first_new - (llama_pos) rows.size();
            if (first < 0) { // a head holds no more rows than there are cells below the new ones
                return set_error(ERR_COMPUTE, "head " + std::to_string(g) + " of layer " + std::to_string(l) +
                                 " holds more rows than cells: the per-head bookkeeping is inconsistent");
            }
            auto & shift = row_shift[l * st->n_head_kv + g];
            for (size_t r = 0; r < rows.size(); ++r) {
                const auto [e, cell, pos] = rows[r];
                const llama_pos to = first + (llama_pos) r;
                if (const int32_t by = (to - e) - (new_pos.at(pos) - pos); by != 0) {
                    shift.resize(st->kv_size, 0);
                    shift[cell] = by;
                }
                numbered_rows.emplace_back(st->side(l, cell, g), to);
            }
        }
    }
    // the window's cells move with the last run of cells: their captured queries turn as the K-shift turns their keys,
    // so the next eviction scores them at the same distances
    const llama_pos delta_last = new_pos.empty() ? 0 : new_pos.rbegin()->second - new_pos.rbegin()->first;
    if (int32_t err = shift_rows_and_queries(*st, st->kv->get_stream(seq_id), row_shift, delta_last)) {
        return err;
    }
    for (const auto & [i, to] : numbered_rows) {
        st->head_pos[i] = to;
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

    // side data follows its cell; offsetting the ring's slot numbering by the last run's shift keeps the window's
    // queries readable (older captured queries are dropped: they are never read)
    auto moved = [&](llama_pos p) {
        const auto it = new_pos.find(p);
        return it == new_pos.end() ? -1 : it->second;
    };
    for (llama_pos & p : st->side_pos) {
        if (p >= 0) {
            p = moved(p);
        }
    }
    if (!new_pos.empty()) {
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
    const auto & pcs = st->kv->get_cells(seq_id).seq_pos_get(seq_id);
    const int64_t n = pcs.size();
    const int64_t m = std::min<int64_t>(n, n_max);
    int64_t i = 0;
    for (const auto & [pos, cell] : pcs) {
        if (i >= m) {
            break;
        }
        for (int64_t g = 0; g < n_kv; ++g) {
            out[g * m + i] = st->held_pos(l, cell, pos, g);
        }
        ++i;
    }
    return (int32_t) n;
}

// llama_kv_evict_seq_get_data's layout: this header; the cells' positions [n_cells]; the position RoPE gave each head's
// row [n_layer_kv][n_cells][n_head_kv] (llama_pos) and its H2O sum (f32, same shape); the window's captured positions
// [n_query]; then per layer of the cache their queries [n_query][n_embd_q] (f32)
struct seq_data_header {
    uint32_t  magic;
    uint32_t  version;
    int32_t   n_layer_kv;
    int32_t   n_head_kv;
    int32_t   n_cells;
    int32_t   n_query;
    llama_pos h2o_last;
};
static constexpr uint32_t SEQ_DATA_MAGIC   = 0x4845564b; // "KVEH"
static constexpr uint32_t SEQ_DATA_VERSION = 1;

// bytes of one query across the layers of the evicted cache, as the window's queries are read and written
static size_t query_bytes(const llama_kv_evict_state & st) {
    size_t n = 0;
    for (int32_t il : st.kv->get_layer_ids()) {
        n += st.ring[il]->nb[1];
    }
    return n;
}

// the queries of the given ring slots, per layer of the cache [n_slots][n_embd_q] f32, to w; returns the end
static uint8_t * get_queries(const llama_kv_evict_state & st, const std::vector<int32_t> & slots, uint8_t * w) {
    for (int32_t il : st.kv->get_layer_ids()) {
        for (int32_t s : slots) {
            ggml_backend_tensor_get(st.ring[il], w, s * st.ring[il]->nb[1], st.ring[il]->nb[1]);
            w += st.ring[il]->nb[1];
        }
    }
    return w;
}

// makes q_pos the captured positions (the ring holds nothing else) and their queries those at r, laid out as get_queries
static void set_queries(llama_kv_evict_state & st, const std::vector<llama_pos> & q_pos, const uint8_t * r) {
    std::fill(st.slot_pos.begin(), st.slot_pos.end(), -1);
    for (llama_pos p : q_pos) {
        st.slot_pos[st.slot(p)] = p;
    }
    for (int32_t il : st.kv->get_layer_ids()) {
        for (llama_pos p : q_pos) {
            ggml_backend_tensor_set(st.ring[il], r, st.slot(p) * st.ring[il]->nb[1], st.ring[il]->nb[1]);
            r += st.ring[il]->nb[1];
        }
    }
}

static size_t seq_data_size(const llama_kv_evict_state & st, const seq_data_header & h) {
    const size_t side = (size_t) h.n_layer_kv * h.n_cells * h.n_head_kv;
    return sizeof(h) + sizeof(llama_pos) * (h.n_cells + side + h.n_query) + sizeof(float) * side + h.n_query * query_bytes(st);
}

int64_t llama_kv_evict_seq_get_data(llama_context * ctx, llama_seq_id seq_id, void * out, size_t size) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    ctx->synchronize();
    const auto & pcs = st->kv->get_cells(seq_id).seq_pos_get(seq_id);
    std::vector<int32_t>   slots;
    std::vector<llama_pos> q_pos;
    st->window_slots(pcs.empty() ? -1 : pcs.rbegin()->first, slots, q_pos);
    const auto layer_ids = st->kv->get_layer_ids();
    const seq_data_header h = { SEQ_DATA_MAGIC, SEQ_DATA_VERSION, (int32_t) layer_ids.size(), (int32_t) st->n_head_kv,
                                (int32_t) pcs.size(), (int32_t) q_pos.size(), st->h2o_last };
    const size_t need = seq_data_size(*st, h);
    if (!out || size < need) {
        return (int64_t) need;
    }
    uint8_t * w = static_cast<uint8_t *>(out);
    auto put = [&w](const void * src, size_t n) { // an empty vector's data() may be null, which memcpy may not take
        if (n > 0) {
            std::memcpy(w, src, n);
            w += n;
        }
    };
    put(&h, sizeof(h));
    for (const auto & pc : pcs) {
        put(&pc.first, sizeof(llama_pos));
    }
    for (int64_t l = 0; l < h.n_layer_kv; ++l) {
        for (const auto & [pos, cell] : pcs) {
            for (int64_t g = 0; g < h.n_head_kv; ++g) {
                const llama_pos e = st->held_pos(l, cell, pos, g);
                put(&e, sizeof(e));
            }
        }
    }
    for (int64_t l = 0; l < h.n_layer_kv; ++l) {
        for (const auto & [pos, cell] : pcs) {
            for (int64_t g = 0; g < h.n_head_kv; ++g) {
                const float acc = st->holds_new_token(cell, pos) ? 0.0f : st->h2o_acc[st->side(l, cell, g)];
                put(&acc, sizeof(acc));
            }
        }
    }
    put(q_pos.data(), q_pos.size() * sizeof(llama_pos));
    get_queries(*st, slots, w);
    st->mask_saved = true;
    return (int64_t) need;
}

int32_t llama_kv_evict_seq_set_data(llama_context * ctx, llama_seq_id seq_id, const void * data, size_t size) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    seq_data_header h{};
    if (!data || size < sizeof(h)) {
        return set_error(ERR_INVALID, "the data is shorter than its header: pass what llama_kv_evict_seq_get_data wrote");
    }
    std::memcpy(&h, data, sizeof(h));
    const auto layer_ids = st->kv->get_layer_ids();
    if (h.magic != SEQ_DATA_MAGIC || h.version != SEQ_DATA_VERSION || h.n_cells < 0 || h.n_query < 0 ||
        h.n_query > st->params.window || h.n_layer_kv != (int32_t) layer_ids.size() || h.n_head_kv != (int32_t) st->n_head_kv ||
        size != seq_data_size(*st, h)) {
        return set_error(ERR_INVALID, "the data was not written by llama_kv_evict_seq_get_data for this model and window");
    }
    const uint8_t * r = static_cast<const uint8_t *>(data) + sizeof(h);
    const size_t side = (size_t) h.n_layer_kv * h.n_cells * h.n_head_kv;
    std::vector<llama_pos> pos(h.n_cells), head_pos(side), q_pos(h.n_query);
    std::vector<float>     h2o_acc(side);
    auto read_into = [&r](void * dst, size_t n) {
        if (n > 0) {
            std::memcpy(dst, r, n);
            r += n;
        }
    };
    read_into(pos.data(), pos.size() * sizeof(llama_pos));
    read_into(head_pos.data(), side * sizeof(llama_pos));
    read_into(h2o_acc.data(), side * sizeof(float));
    read_into(q_pos.data(), q_pos.size() * sizeof(llama_pos));

    ctx->synchronize();
    const auto & pcs = st->kv->get_cells(seq_id).seq_pos_get(seq_id);
    if (!std::equal(pos.begin(), pos.end(), pcs.begin(), pcs.end(), [](llama_pos p, const auto & pc) { return p == pc.first; })) {
        return set_error(ERR_INVALID, "the data belongs to other cells than the sequence holds: load the state it was saved "
                                      "beside first");
    }
    const llama_pos pos_max = pos.empty() ? -1 : pos.back();
    if (std::any_of(head_pos.begin(), head_pos.end(), [](llama_pos p) { return p < -1; }) ||
        !std::is_sorted(q_pos.begin(), q_pos.end()) ||
        std::any_of(q_pos.begin(), q_pos.end(), [&](llama_pos p) { return p > pos_max || p <= pos_max - st->params.window; })) {
        return set_error(ERR_INVALID, "the data holds a row at a negative position or queries outside the window: it cannot be restored");
    }

    // the cells count as scored: their side data is set (norms are computed again from the rows); -1: an -ada head
    // holds no token in the cell, which the mask hides from it
    int64_t i = 0;
    st->any_absent = false;
    for (const auto & [p, cell] : pcs) {
        st->side_pos[cell]   = p;
        st->norm_valid[cell] = 0;
        for (int64_t l = 0; l < h.n_layer_kv; ++l) {
            for (int64_t g = 0; g < h.n_head_kv; ++g) {
                const size_t at = st->side(l, cell, g), from = (l * h.n_cells + i) * h.n_head_kv + g;
                st->head_pos[at]    = head_pos[from];
                st->h2o_acc[at]     = h2o_acc[from];
                st->head_absent[at] = head_pos[from] == -1;
                st->any_absent     |= head_pos[from] == -1;
            }
        }
        ++i;
    }
    st->min_written = pos_max + 1;
    st->h2o_last    = h.h2o_last;
    st->mask_saved  = false; // a state written from here is saved beside data read again
    set_queries(*st, q_pos, r);
    return 0;
}

int64_t llama_kv_evict_get_window_queries(llama_context * ctx, llama_seq_id seq_id, void * out, size_t size) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    ctx->synchronize();
    std::vector<int32_t>   slots;
    std::vector<llama_pos> q_pos;
    st->window_slots(st->kv->seq_pos_max(seq_id), slots, q_pos);
    const size_t need = slots.size() * query_bytes(*st);
    if (out && size >= need) {
        get_queries(*st, slots, static_cast<uint8_t *>(out));
    }
    return (int64_t) need;
}

int32_t llama_kv_evict_set_window_queries(llama_context * ctx, llama_seq_id seq_id, const void * data, size_t size) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    const size_t row = query_bytes(*st);
    if (!data || size == 0 || size % row != 0 || size / row > (size_t) st->params.window) {
        return set_error(ERR_INVALID, "the queries are not 1 to window queries of this model: pass what "
                                      "llama_kv_evict_get_window_queries wrote on a context of the same model and window");
    }
    const llama_pos n = (llama_pos) (size / row), pos_max = st->kv->seq_pos_max(seq_id);
    if (pos_max + 1 < n) {
        return set_error(ERR_INVALID, "the sequence holds fewer positions than the queries: nothing to evict yet");
    }
    std::vector<llama_pos> q_pos(n);
    for (llama_pos i = 0; i < n; ++i) {
        q_pos[i] = pos_max - n + 1 + i;
    }
    ctx->synchronize();
    set_queries(*st, q_pos, static_cast<const uint8_t *>(data));
    return 0;
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

int32_t llama_kv_evict_queries(llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_pos * pos, float * q,
        int32_t n_max, int32_t * n_embd_q, float * kq_scale) {
    llama_kv_evict_state * st = nullptr;
    if (int32_t err = enabled_layer(ctx, seq_id, il, st); err < 0) {
        return err;
    }
    ctx->synchronize();
    std::vector<int32_t>   slots;
    std::vector<llama_pos> q_pos;
    st->window_slots(st->kv->seq_pos_max(seq_id), slots, q_pos);
    const ggml_tensor * ring = st->ring[il];
    for (int32_t i = 0; i < std::min<int32_t>((int32_t) slots.size(), n_max); ++i) {
        if (pos) {
            pos[i] = q_pos[i];
        }
        if (q) {
            ggml_backend_tensor_get(ring, q + i * ring->ne[0], slots[i] * ring->nb[1], ring->nb[1]);
        }
    }
    if (n_embd_q) {
        *n_embd_q = (int32_t) ring->ne[0];
    }
    if (kq_scale) {
        *kq_scale = st->kq_scale[il];
    }
    return (int32_t) slots.size();
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
        stats->value_norm_kernel  = st->value_norm_kernel;
        stats->window_attn_kernel = st->window_attn_kernel;
        stats->scoring_bytes      = st->scoring_bytes;
    }
    return 0;
}

const char * llama_kv_evict_last_error(void) {
    return g_last_error.c_str();
}

int32_t llama_kv_evict_adakv_shares(const float * scores, int32_t n_head, int32_t n, int32_t budget, float alpha, int32_t cap, int32_t * share) {
    if (!scores || !share || n_head < 1 || n < 0 || budget < 0 || cap < 1 || (int64_t) n_head * budget > (int64_t) n_head * n) {
        return set_error(ERR_INVALID, "adakv_shares: scores and share must not be NULL, n_head >= 1, cap >= 1, 0 <= budget <= n");
    }
    std::vector<std::vector<float>> s(n_head);
    for (int32_t h = 0; h < n_head; ++h) {
        s[h].assign(scores + (int64_t) h * n, scores + (int64_t) (h + 1) * n);
    }
    const std::vector<int64_t> sh = adakv_shares(s, nullptr, budget, alpha, cap);
    std::copy(sh.begin(), sh.end(), share);
    return 0;
}
