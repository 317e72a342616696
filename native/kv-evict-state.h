// State of the eviction hook for one llama_context (internal).
#pragma once

#include "llama.h"
#include "ggml-cpp.h"
#include "kv-evict-policy.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

struct llama_hparams;

struct llama_context;
struct llama_memory_i;
class  llama_kv_cache;

// The parts of an eviction, timed apart (llama_kv_evict_profile, in this order)
enum evict_phase {
    EVICT_PHASE_SETTLE,  // waiting for the decode still running on the backend
    EVICT_PHASE_NORMS,   // projected-value norms of the cells new since the last eviction
    EVICT_PHASE_SCORE,   // the rest of scoring: window attention, pooling, bookkeeping
    EVICT_PHASE_SELECT,  // choosing each head's kept cells on the host
    EVICT_PHASE_COMPACT, // moving kept rows and removing the rest
    EVICT_PHASE_COUNT,
};

// What the hook keeps for one sequence. Each sequence of a context has cells of its own (llama.cpp's stream of that
// sequence, kv_unified = false), so the side data is indexed by the sequence's cells and its window's queries fill
// rows of their own in each layer's query ring.
struct kv_evict_seq {
    int32_t  window    = 0;
    int32_t  ring_row0 = 0; // the sequence's first row in the query rings
    uint32_t kv_size   = 0; // cells of the sequence's stream
    int64_t  n_head_kv = 0;

    // the query of position pos is in ring row ring_row0 + slot(pos); slot_pos: position whose query each slot holds,
    // -1 = none; slot_offset changes when positions are compacted, so the window's slots stay put
    std::vector<llama_pos> slot_pos;
    int32_t slot_offset = 0;
    int32_t slot(llama_pos pos) const { return ((pos + slot_offset) % window + window) % window; }
    // the ring rows holding the window's queries (positions pos_max - window + 1 .. pos_max), in position order
    void window_slots(llama_pos pos_max, std::vector<int32_t> & rows, std::vector<llama_pos> & pos) const {
        for (llama_pos qp = std::max<llama_pos>(0, pos_max - window + 1); qp <= pos_max; ++qp) {
            const int32_t s = slot(qp);
            if (slot_pos[s] == qp) {
                rows.push_back(ring_row0 + s);
                pos.push_back(qp);
            }
        }
    }

    // lowest position written by a decode since the last scoring: cells at or above it hold new K/V
    llama_pos min_written = 0;

    // per-cell side data, [n_layer_kv][kv_size][n_head_kv]; valid while side_pos[cell] is the cell's position
    std::vector<float>     value_norm;
    // attention the row got, summed over the queries that scored it: H2O's window queries, or the repeat probes'
    std::vector<float>     attn_sum;
    // the largest score a repeat probe's queries gave the row (llama_kv_evict_probe; DefensiveKV's pooled maximum,
    // before its floor): kept across evictions with attn_sum, since a probe repeats only the text read since the last one
    std::vector<float>     probe_max;
    std::vector<llama_pos> head_pos;    // position RoPE gave each head's row: its token's, or renumbering's (moves with compaction)
    std::vector<llama_pos> side_pos;
    std::vector<uint8_t>   norm_valid;  // [kv_size]
    // the head holds no token in this cell: its AdaKV share is shorter than the cells kept, and the layer's attention
    // masks the cell for that head (valid while the cell holds no new token)
    std::vector<uint8_t>   head_absent;
    bool any_absent = false;
    // llama_kv_evict_seq_get_data wrote the mask as it is: a llama.cpp state written now is saved beside it
    bool mask_saved = false;
    llama_pos h2o_last = -1;            // last query position accumulated into attn_sum
    bool probed = false;                // a probe scored the cells since the last eviction, which ranks them by probe_max
    // per layer, the attention the probes' queries since the last eviction put on the probes' own cells, and how many
    // queries: DefensiveKV's stage 1 protects up to 0.9 less their mean
    std::vector<double> probe_self_mass;
    int64_t probe_n_q = 0;

    // the caller's score of the token at each position (scorer::given), until the position is removed or renumbered
    std::map<llama_pos, float> given;

    int32_t n_evictions = 0;
    int64_t n_evicted   = 0;
    int64_t t_evict_us  = 0;
    std::array<int64_t, EVICT_PHASE_COUNT> t_phase_us{}; // where t_evict_us went (llama_kv_evict_profile)

    kv_evict_seq(int32_t window, int32_t ring_row0, uint32_t kv_size, int64_t n_head_kv, int64_t n_layer_kv)
        : window(window), ring_row0(ring_row0), kv_size(kv_size), n_head_kv(n_head_kv), slot_pos(window, -1),
          value_norm(n_layer_kv * kv_size * n_head_kv, 0.0f), attn_sum(value_norm.size(), 0.0f),
          probe_max(value_norm.size(), 0.0f),
          head_pos(value_norm.size(), -1), side_pos(kv_size, -1), norm_valid(kv_size, 0), head_absent(value_norm.size(), 0),
          probe_self_mass(n_layer_kv, 0.0) {}

    // the cells hold other tokens now (a state was read): the bookkeeping starts afresh
    void forget() {
        std::fill(side_pos.begin(), side_pos.end(), -1);
        std::fill(norm_valid.begin(), norm_valid.end(), 0);
        std::fill(slot_pos.begin(), slot_pos.end(), -1);
        any_absent = false;
        h2o_last   = -1;
        given.clear();
        end_probes();
    }

    // the next eviction ranks by the window's queries again
    void end_probes() {
        probed    = false;
        probe_n_q = 0;
        std::fill(probe_self_mass.begin(), probe_self_mass.end(), 0.0);
    }

    // whether the cell at pos holds K/V decoded since its side data was last set (reused cell, or a new write)
    bool holds_new_token(uint32_t cell, llama_pos pos) const { return side_pos[cell] != pos || pos >= min_written; }

    // index of (layer l of the evicted cache, cell, KV head g) in the side data
    size_t side(int64_t l, uint32_t cell, int64_t g) const { return ((size_t) l * kv_size + cell) * n_head_kv + g; }

    bool absent(int64_t l, uint32_t cell, llama_pos pos, int64_t g) const {
        return any_absent && head_absent[side(l, cell, g)] && !holds_new_token(cell, pos);
    }

    // position RoPE gave the row head g of layer l holds in the cell at pos: pos itself for a new token, another
    // token's after head-wise compaction moved its row here or renumbering turned it, -1 where an -ada head holds none
    llama_pos held_pos(int64_t l, uint32_t cell, llama_pos pos, int64_t g) const {
        if (holds_new_token(cell, pos)) {
            return pos;
        }
        return absent(l, cell, pos, g) ? -1 : head_pos[side(l, cell, g)];
    }
};

struct llama_kv_evict_state {
    llama_context       * lctx = nullptr;
    llama_kv_cache      * kv   = nullptr; // the cache eviction acts on: the full-attention one of an iSWA pair
    llama_kv_evict_params params{};

    // query ring per model layer (nullptr for layers outside `kv`): [n_embd_head_k * n_head, window * n_seq + 1] f32,
    // on the backend of that layer's K cache; each sequence's window in its rows, the last row takes the queries a
    // decode does not keep (those of a batch's tokens before their sequence's window)
    std::vector<ggml_tensor *> ring;
    std::vector<float>         kq_scale;  // per model layer, as build_attn passed it
    std::vector<ggml_context_ptr>        ring_ctxs;
    std::vector<ggml_backend_buffer_ptr> ring_bufs;
    int32_t discard_row() const { return params.window * (int32_t) seqs.size(); }

    std::vector<kv_evict_seq> seqs; // per sequence id
    int64_t n_head_kv = 0;

    // the policy's parts (params are validated when the hook is enabled)
    const kv_evict::policy & policy() const { return *kv_evict::find_policy(params.policy); }
    // the policy shares each layer's cells unequally between heads: per-head masks, up to 2 x budget - window cells
    bool ada() const { return policy().shares_heads(); }

    // set while the hook edits the cache itself, so that its own removals do not come back through
    // llama_kv_evict_on_seq_rm
    bool editing = false;

    // scoring graphs run on their own scheduler over the context's backends, so the context's graphs stay reusable
    ggml_backend_sched_ptr sched;
    int32_t sched_graph_size = 0;

    int32_t value_norm_kernel  = 0; // kv_evict::scoring_kernel that computed the last norms
    int32_t window_attn_kernel = 0; // kv_evict::scoring_kernel that computed the last window attention
    int32_t compact_kernel     = 0; // kv_evict::scoring_kernel that moved a transposed V cache's rows last
    size_t  scoring_bytes      = 0; // largest compute buffers of the hook's graphs so far
};

namespace kv_evict {

// Scores of one sequence, as the policies consume them. Cells in position order; the last n_window are the
// observation window (always kept, not scored).
struct seq_scores {
    std::vector<uint32_t>  cells;   // cache cell of each position
    std::vector<llama_pos> pos;
    int64_t n_window = 0;
    int64_t n_prefix() const { return (int64_t) pos.size() - n_window; }

    // [n_layer_kv][n_head_kv][n_prefix]
    std::vector<float> score;      // policy attention score (pooled and group-averaged for snapkv/criticalkv)
    std::vector<float> value_norm; // group mean of |V_i W_O^h|_1 (criticalkv, or when asked for)
    std::vector<uint8_t> absent;   // the head holds no token in the cell (AdaKV); empty when every head holds every cell
};

// Collects the sequence's cells and scores them with ggml graphs on the cache's backends.
// commit: fold this call's queries into the H2O accumulators (llama_kv_evict), not for a preview (llama_kv_evict_scores)
// probe_end >= 0: fold the scores of the cells below it into probe_max instead (llama_kv_evict_probe); < 0 after a
// probe: the cells are ranked by probe_max, not by the window's queries, and a given share guarded (guard_given)
// need_norms: the value norms into out.value_norm; DefensiveKV's rescale computes them whatever it says
// Returns 0 or a negative error code with the message set.
int32_t score_sequence(llama_kv_evict_state & st, llama_seq_id seq_id, bool need_norms, bool commit, seq_scores & out,
        llama_pos probe_end = -1);

// The caller's scores of the sequence's prefix cells (out.pos, out.cells, out.n_window set) in every layer and head, the
// first n_sink kept as attention sinks; drops the scores of positions the sequence no longer holds
int32_t given_scores(llama_kv_evict_state & st, llama_seq_id seq_id, seq_scores & out);

// A policy with a given_share: its top given_share x (budget - window) prefix cells by the caller's scores (the sinks
// first) scored +inf in every head, so any selection keeps them; the rest as the scorer ranked them
int32_t guard_given(llama_kv_evict_state & st, llama_seq_id seq_id, seq_scores & out);

int32_t set_error(int32_t code, const std::string & msg);

// The cache eviction acts on: a plain KV cache, or the full-attention one of an iSWA pair; nullptr for other memory
llama_kv_cache * full_attention_cache(llama_memory_i * mem);

// Checks shared by the entry points; each returns 0 or a negative error code with the message set.
// enabled_state: the hook of ctx, nullptr if disabled; check_seq: enabled, and seq_id in range; seq_cache: the cache
// of seq_id, enabled or not; layer_index / enabled_layer: the index of model layer il among the evicted cache's layers
llama_kv_evict_state * enabled_state(llama_context * ctx);
int32_t check_seq_id(const llama_context * ctx, llama_seq_id seq_id);
int32_t check_seq(llama_kv_evict_state * st, llama_seq_id seq_id);
int32_t seq_cache(llama_context * ctx, llama_seq_id seq_id, llama_kv_cache *& kv);
int32_t layer_index(llama_kv_cache & kv, int32_t il);
int32_t enabled_layer(llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_kv_evict_state *& st);

// Waits for the context's work and applies the cache updates llama.cpp defers to the next decode (a K-shift after
// seq_add, the rows seq_cp copies into another sequence's stream): the hook is about to read or move rows
void settle(llama_context * ctx);

// The hook's own removals: not the user's, so llama_kv_evict_on_seq_rm leaves them alone
bool edit_seq_rm(llama_kv_evict_state & st, llama_seq_id seq_id, llama_pos p0, llama_pos p1);

// Before the hook goes: the cells where some head holds no token leave the cache (the per-head mask goes with the hook)
void drop_absent_cells(llama_kv_evict_state & st);

// Cells the sequence would hold if every head kept only the cells it holds a token in
int64_t held_cells(const llama_kv_evict_state & st, llama_seq_id seq_id);

// Removes all but the kept cells of the scored sequence: one set for every head (token granularity), or each head's
// own cells compacted into the first ones (head granularity). Return the cells removed or an error code
int32_t evict_tokens(llama_kv_evict_state & st, llama_seq_id seq_id, const seq_scores & sc, int64_t n_layer_kv, int64_t n_kv);
int32_t evict_heads(llama_kv_evict_state & st, llama_seq_id seq_id, const seq_scores & sc, int64_t n_layer_kv, int64_t n_kv);

// Head granularity: "" if the cache can be compacted head-wise, else why not
std::string head_granularity_unsupported(llama_kv_cache & kv, const llama_hparams & hparams);

// Moves, for every layer l and KV head h, the rows of cells src[l*n_head_kv + h][j] into cells dst[j]
int32_t compact_heads(llama_kv_evict_state & st, uint32_t stream, const std::vector<uint32_t> & dst,
        const std::vector<std::vector<uint32_t>> & src);

// RoPE-shifts, for every layer l and KV head h with a non-empty shift[l*n_head_kv + h] (one entry per cell of seq_id's
// stream), that head's K row of each cell by the cell's entry, and the sequence's captured queries of every layer by
// query_shift (as the K-shift turns the keys of their cells)
int32_t shift_rows_and_queries(llama_kv_evict_state & st, llama_seq_id seq_id, const std::vector<std::vector<int32_t>> & shift,
        llama_pos query_shift);

enum error_code : int32_t {
    ERR_INVALID     = -1,
    ERR_UNSUPPORTED = -2,
    ERR_DISABLED    = -3,
    ERR_COMPUTE     = -4,
    ERR_NO_QUERIES  = -5,
};

} // namespace kv_evict
