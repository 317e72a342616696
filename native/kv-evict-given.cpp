// Cells ranked by a score the caller gives each token (scorer::given). pyllmkv's surprisal is one: a word's summed
// -log p as the model read it (Selective Context, Li et al. 2023), which needs the logits of every token read; those
// live with the caller, who decodes, not in the cache.
#include "kv-evict-state.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <cmath>

namespace kv_evict {

int32_t given_scores(llama_kv_evict_state & st, llama_seq_id seq_id, seq_scores & out) {
    kv_evict_seq & seq = st.seqs[seq_id];
    const int64_t n_layer_kv = st.kv->get_layer_ids().size();
    const int64_t n_prefix   = out.n_prefix();
    const int64_t n_sink     = std::min<int64_t>(st.params.n_sink, n_prefix);

    std::vector<float> row(n_prefix);
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
    // only the positions still held keep a score, so those evicted do not pile up over a long chat
    std::map<llama_pos, float> held;
    for (llama_pos p : out.pos) {
        if (const auto it = seq.given.find(p); it != seq.given.end()) {
            held.emplace_hint(held.end(), *it);
        }
    }
    seq.given.swap(held);

    out.score.resize(n_layer_kv * st.n_head_kv * n_prefix);
    for (int64_t hh = 0; hh < n_layer_kv * st.n_head_kv; ++hh) {
        std::copy(row.begin(), row.end(), out.score.begin() + hh * n_prefix);
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
    if (st->policy().score != scorer::given) {
        return set_error(ERR_UNSUPPORTED, std::string("policy ") + st->policy().name + " scores the cells itself (scorer " +
                         name(st->policy().score) + "): token scores are for a policy of scorer given, such as surprisal");
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
