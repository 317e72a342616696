// Renumbering: a sequence's cells back to positions 0..n-1, so a conversation goes on past the trained context.
#include "kv-evict-state.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include <algorithm>
#include <map>
#include <set>
#include <tuple>

using namespace kv_evict;

int32_t llama_kv_evict_compact_positions(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    llama_memory_t mem = ctx->get_memory();
    if (!llama_memory_can_shift(mem)) {
        return set_error(ERR_UNSUPPORTED, "this model's cache cannot shift positions (no RoPE shift), so they cannot be compacted");
    }
    settle(ctx);
    kv_evict_seq & seq = st->seqs[seq_id];

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
        if (seq.holds_new_token(cell, pos)) {
            first_new = std::min(first_new, new_pos.at(pos));
        }
    }
    std::vector<std::vector<int32_t>> row_shift(n_layer_kv * st->n_head_kv);
    std::vector<std::pair<size_t, llama_pos>> numbered_rows; // (side index, number): written once every head is checked and turned
    for (int64_t l = 0; l < n_layer_kv; ++l) {
        for (int64_t g = 0; g < st->n_head_kv; ++g) {
            std::vector<std::tuple<llama_pos, uint32_t, llama_pos>> rows; // (position RoPE gave the row, cell, cell's position)
            for (const auto & [pos, cell] : pcs) {
                if (const llama_pos e = seq.held_pos(l, cell, pos, g); e >= 0 && !seq.holds_new_token(cell, pos)) {
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
                    shift.resize(seq.kv_size, 0);
                    shift[cell] = by;
                }
                numbered_rows.emplace_back(seq.side(l, cell, g), to);
            }
        }
    }
    // the window's cells move with the last run of cells: their captured queries turn as the K-shift turns their keys,
    // so the next eviction scores them at the same distances
    const llama_pos delta_last = new_pos.empty() ? 0 : new_pos.rbegin()->second - new_pos.rbegin()->first;
    if (int32_t err = shift_rows_and_queries(*st, seq_id, row_shift, delta_last)) {
        return err;
    }
    for (const auto & [i, to] : numbered_rows) {
        seq.head_pos[i] = to;
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
    for (llama_pos & p : seq.side_pos) {
        if (p >= 0) {
            p = moved(p);
        }
    }
    std::map<llama_pos, float> given;
    for (const auto & [p, score] : seq.given) {
        if (const llama_pos q = moved(p); q >= 0) {
            given[q] = score;
        }
    }
    seq.given.swap(given);
    if (!new_pos.empty()) {
        for (llama_pos & p : seq.slot_pos) {
            const llama_pos q = p >= 0 ? moved(p) : -1;
            p = q >= 0 && q - p == delta_last ? q : -1;
        }
        seq.slot_offset = ((seq.slot_offset - delta_last) % seq.window + seq.window) % seq.window;
        seq.min_written = std::min<llama_pos>(seq.min_written + delta_last, new_pos.size());
        seq.h2o_last    = seq.h2o_last < 0 ? -1 : seq.h2o_last + delta_last;
    }
    return (int32_t) new_pos.size();
}
