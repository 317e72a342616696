// Cells ranked by a score the caller gives each token (scorer::given), or a share of the budget kept by it before
// another scorer picks the rest (policy::given_share). pyllmkv's surprisal is one: a word's summed -log p as the model
// read it (Selective Context, Li et al. 2023), which needs the logits of every token read; those live with the
// caller, who decodes, not in the cache.
#include "kv-evict-state.h"
#include "kv-evict-select.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>

namespace kv_evict {

namespace {

// The caller's score of each prefix cell's token, the first n_sink at +inf; forgets the scores of positions no longer held
int32_t given_row(llama_kv_evict_state & st, llama_seq_id seq_id, const seq_scores & out, std::vector<float> & row) {
    kv_evict_seq & seq = st.seqs[seq_id];
    const int64_t n_prefix = out.n_prefix();
    const int64_t n_sink   = std::min<int64_t>(st.params.n_sink, n_prefix);

    row.resize(n_prefix);
    for (int64_t i = 0; i < n_prefix; ++i) {
        const auto it = seq.given.find(out.pos[i]);
        if (i < n_sink) {
            row[i] = INFINITY;
        } else if (it == seq.given.end()) {
            return set_error(ERR_INVALID, "policy " + std::string(st.policy().name) + " ranks cells by the scores the caller "
                             "gives their tokens, and position " + std::to_string(out.pos[i]) + " has none: call "
                             "llama_kv_evict_set_token_scores for every token decoded (pyllmkv's Session does)");
        } else {
            row[i] = it->second;
        }
    }
    // max-pooled over the tokens within pool_kernel / 2 positions: a fact's key and number raise the words that join
    // them, which a question needs to pair them
    const llama_pos half = st.params.pool_kernel / 2;
    const std::vector<float> own(row.begin(), row.end());
    for (int64_t i = n_sink, lo = n_sink; i < n_prefix; ++i) {
        while (out.pos[lo] < out.pos[i] - half) {
            ++lo;
        }
        for (int64_t j = lo; j < n_prefix && out.pos[j] <= out.pos[i] + half; ++j) {
            row[i] = std::max(row[i], own[j]);
        }
    }
    // only the positions still held keep a score, so those evicted do not pile up over a long chat
    std::map<llama_pos, float> held;
    for (llama_pos p : out.pos) {
        if (const auto it = seq.given.find(p); it != seq.given.end()) {
            held.emplace_hint(held.end(), *it);
        }
    }
    seq.given.swap(held);
    return 0;
}

} // namespace

int32_t given_scores(llama_kv_evict_state & st, llama_seq_id seq_id, seq_scores & out) {
    std::vector<float> row;
    if (int32_t err = given_row(st, seq_id, out, row)) {
        return err;
    }
    const int64_t n_heads = st.kv->get_layer_ids().size() * st.n_head_kv;
    out.score.resize(n_heads * row.size());
    for (int64_t hh = 0; hh < n_heads; ++hh) {
        std::copy(row.begin(), row.end(), out.score.begin() + hh * row.size());
    }
    return 0;
}

int32_t guard_given(llama_kv_evict_state & st, llama_seq_id seq_id, seq_scores & out) {
    const policy & pol = st.policy();
    if (pol.given_share <= 0.0f || out.n_prefix() == 0) {
        return 0;
    }
    std::vector<float> row;
    if (int32_t err = given_row(st, seq_id, out, row)) {
        return err;
    }
    const int64_t n_prefix = row.size();
    const int64_t n_guard  = (int64_t) std::floor(pol.given_share * (st.params.budget - out.n_window));
    const int64_t n_heads  = out.score.size() / n_prefix;
    for (int64_t i : top_k(row, n_guard)) {
        for (int64_t hh = 0; hh < n_heads; ++hh) {
            out.score[hh * n_prefix + i] = INFINITY;
        }
    }
    return 0;
}

} // namespace kv_evict

using namespace kv_evict;

int32_t llama_kv_evict_set_token_scores(llama_context * ctx, llama_seq_id seq_id, const llama_pos * pos, const float * score,
        int32_t n) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    if (!st->policy().takes_token_scores()) {
        return set_error(ERR_UNSUPPORTED, std::string("policy ") + st->policy().name + " scores the cells itself (scorer " +
                         name(st->policy().score) + "): token scores are for surprisal and defensivekv-surprisal");
    }
    if (n < 0 || (n > 0 && (!pos || !score))) {
        return set_error(ERR_INVALID, "pos and score must hold n >= 0 entries");
    }
    for (int32_t i = 0; i < n; ++i) {
        if (pos[i] < 0 || std::isnan(score[i])) {
            return set_error(ERR_INVALID, "position " + std::to_string(pos[i]) + ": positions must be >= 0 and scores not NaN");
        }
    }
    auto & given = st->seqs[seq_id].given;
    for (int32_t i = 0; i < n; ++i) {
        given[pos[i]] = score[i];
    }
    return 0;
}
