// Policies as descriptions: each is a scorer, an optional rescale and an allocation, composed the way kvpress composes
// presses. The hook asks a policy's parts, never its name; a new policy made of these parts is one line of the table in
// kv-evict-policy.cpp (and its enum value in llama.h).
#pragma once

#include "llama.h"

#include <cstdint>

namespace kv_evict {

// What scores a cell from the window's queries
enum class scorer : int32_t {
    recency,     // none: the first n_sink cells and the most recent (StreamingLLM)
    window_mean, // the window's mean attention, pooled over pool_kernel cells (SnapKV)
    last_query,  // the last query's attention (TOVA)
    accumulated, // attention summed over every query since the cell was written (H2O)
    window_max,  // the maximum over the window's queries of their pooled rows, floored at the head's mean, and the
                 // cells holding 0.9 of the mean attention protected (DefensiveKV)
    key_norm,    // minus the key's L2 norm: keys of small norm draw attention, whatever the query (KNorm)
    given,       // the caller's score of the cell's token (llama_kv_evict_set_token_scores), in every layer and head, the
                 // largest within pool_kernel / 2 positions: pyllmkv's surprisal, which needs the logits of every token
                 // read and so lives where they are
};

// What reweighs the attention score by the cell's projected value |V_i W_O^h|_1
enum class rescale : int32_t {
    none,
    two_stage,   // part of the budget by attention alone, the rest by (attention + epsilon) x norm (CriticalKV)
    norm_share,  // times the cell's share of the norms across the layer's KV heads (DefensiveKV)
};

// How the kept cells are shared among heads
enum class allocation : int32_t {
    uniform, // every head keeps the same number of cells (or, at token granularity, one set for all)
    adakv,   // each layer's heads share n_head_kv x budget by their scores, with a floor per head (AdaKV)
    layer,   // one top-k over a layer's (head, cell) pairs, no floor (DefensiveKV)
    model,   // one top-k over every layer's pairs: a layer keeps what it wins (LayerDefensiveKV)
};

struct policy {
    llama_kv_evict_policy id;
    const char * name;       // as pyllmkv's --policy names it
    scorer     score;
    rescale    weigh;
    allocation share;
    // share of the budget kept by the caller's token scores (scorer::given's) before the scorer picks the rest: tokens
    // whole, in every head, so a fact the window's queries miss survives beside what they look at
    float      given_share = 0.0f;

    bool pooled()            const { return score == scorer::window_mean || score == scorer::window_max; }
    bool needs_value_norms() const { return weigh != rescale::none; }
    // unequal shares: granularity head only, a per-head mask, and up to 2 x budget - window cells
    bool shares_heads()      const { return share != allocation::uniform; }
    bool takes_token_scores() const { return score == scorer::given || given_share > 0.0f; }
    // every head ranks the cells alike, or the caller's scores must keep naming each cell's token: tokens go whole
    bool same_in_every_head() const { return score == scorer::recency || takes_token_scores(); }
};

// Most cells a head keeps outside the window when heads share a layer's cells: twice the per-head budget, since every
// cell a share adds is a cell of every head and layer in llama.cpp's cache
inline int64_t head_share_cap(int64_t head_budget) { return 2 * head_budget; }

// The policy of enum value id, or nullptr if there is none
const policy * find_policy(int32_t id);

// Every policy, in enum order; n gets their number
const policy * policies(int32_t & n);

// The parts' names, as llama_kv_evict_policy_describe gives them
const char * name(scorer s);
const char * name(rescale r);
const char * name(allocation a);

} // namespace kv_evict
