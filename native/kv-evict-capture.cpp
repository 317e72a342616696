// The hook points llama.cpp calls (llama-kv-evict-hook.h): query capture and the -ada per-head mask in every layer's
// attention, the user's removals, state I/O and the state's end.
#include "llama-kv-evict-hook.h"
#include "kv-evict-state.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"
#include "llama-graph.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>

namespace kv_evict {

namespace {

// Cells a ubatch writes hold new tokens in every head: noted by whichever of the hook's graph inputs is set first
void note_written(llama_kv_evict_state * st, const llama_ubatch * ubatch) {
    for (uint32_t t = 0; t < ubatch->n_tokens; ++t) {
        kv_evict_seq & seq = st->seqs[ubatch->seq_id[t][0]];
        seq.min_written = std::min(seq.min_written, ubatch->pos[t]);
    }
}

// Writes at every decode the ring row each captured query goes to: its sequence's slot for the tokens among the last
// `window` of their sequence in the batch, the discard row for the others. One per layer: each is a few integers.
class graph_input_capture : public llm_graph_input_i {
public:
    graph_input_capture(llama_kv_evict_state * st, int64_t n_tokens, int64_t n_capture)
        : st(st), n_tokens(n_tokens), n_capture(n_capture) {}

    void set_input(const llama_ubatch * ubatch) override {
        note_written(st, ubatch);
        std::vector<llama_pos> pos_max(st->seqs.size(), -1);
        for (uint32_t t = 0; t < ubatch->n_tokens; ++t) {
            pos_max[ubatch->seq_id[t][0]] = std::max(pos_max[ubatch->seq_id[t][0]], ubatch->pos[t]);
        }
        std::vector<int64_t> idx(n_capture, st->discard_row());
        for (int64_t t = 0; t < n_capture; ++t) {
            const int64_t      i      = n_tokens - n_capture + t;
            const llama_seq_id seq_id = ubatch->seq_id[i][0];
            const llama_pos    pos    = ubatch->pos[i];
            if (pos > pos_max[seq_id] - st->params.window) {
                kv_evict_seq & seq = st->seqs[seq_id];
                seq.slot_pos[seq.slot(pos)] = pos;
                idx[t] = seq.ring_row0 + seq.slot(pos);
            }
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

// The -ada policies' per-head mask of layer l: -inf where a KV head holds no token in the cell, one row per KV head
// (the graph repeats it for the query heads of its group), added to llama.cpp's own mask (one per cell, shared by the
// heads). It is filled on the host for every ubatch, so it is as small as the KV heads make it.
class graph_input_head_mask : public llm_graph_input_i {
public:
    graph_input_head_mask(llama_kv_evict_state * st, int64_t l, int64_t n_tokens) : st(st), l(l), n_tokens(n_tokens) {}

    void set_input(const llama_ubatch * ubatch) override {
        note_written(st, ubatch);
        // one mask per stream of the ubatch, as llama.cpp's: stream s holds the s-th run of n_tokens / n_stream tokens
        const int64_t n_cells  = mask->ne[0];
        const int64_t n_kv     = mask->ne[2];
        const int64_t n_stream = mask->ne[3];
        std::vector<float> m(n_cells * n_kv * n_stream, 0.0f);
        for (int64_t s = 0; s < n_stream; ++s) {
            const llama_seq_id   seq_id = ubatch->seq_id[s * (ubatch->n_tokens / n_stream)][0];
            const kv_evict_seq & seq    = st->seqs[seq_id];
            const auto &         cells  = st->kv->get_cells(seq_id);
            if (!seq.any_absent) {
                continue;
            }
            for (int64_t c = 0; c < n_cells; ++c) {
                if (cells.is_empty(c)) {
                    continue;
                }
                const llama_pos pos = cells.pos_get(c);
                for (int64_t g = 0; g < n_kv; ++g) {
                    if (seq.absent(l, c, pos, g)) {
                        m[(s * n_kv + g) * n_cells + c] = -INFINITY;
                    }
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

    ggml_tensor * mask = nullptr; // [n_kv cells, 1, n_head_kv, n_stream], the type of llama.cpp's mask

private:
    llama_kv_evict_state * st;
    const int64_t l;
    const int64_t n_tokens;
};

} // namespace

// The hook's own removals: not the user's, so llama_kv_evict_on_seq_rm leaves them alone
bool edit_seq_rm(llama_kv_evict_state & st, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    st.editing = true;
    const bool ok = st.kv->seq_rm(seq_id, p0, p1);
    st.editing = false;
    return ok;
}

// The per-head mask lives in the hook: before the hook goes, the cells where a head holds no token leave the cache,
// or that head would attend whatever row the cell holds
void drop_absent_cells(llama_kv_evict_state & st) {
    st.lctx->synchronize();
    const int64_t n_layer_kv = st.kv->get_layer_ids().size();
    for (llama_seq_id seq_id = 0; seq_id < (llama_seq_id) st.seqs.size(); ++seq_id) {
        kv_evict_seq & seq = st.seqs[seq_id];
        if (!seq.any_absent) {
            continue;
        }
        std::vector<llama_pos> drop;
        for (const auto & [pos, cell] : st.kv->get_cells(seq_id).seq_pos_get(seq_id)) {
            for (int64_t l = 0; l < n_layer_kv; ++l) {
                for (int64_t g = 0; g < st.n_head_kv; ++g) {
                    if (seq.absent(l, cell, pos, g) && (drop.empty() || drop.back() != pos)) {
                        drop.push_back(pos);
                    }
                }
            }
        }
        for (llama_pos pos : drop) {
            edit_seq_rm(st, seq_id, pos, pos + 1);
        }
        seq.any_absent = false;
    }
}

} // namespace kv_evict

using namespace kv_evict;

ggml_tensor * llama_kv_evict_attn(llama_kv_evict_state * st, ggml_context * ctx0, ggml_cgraph * gf, llm_graph_result * res,
        ggml_tensor * q_cur, ggml_tensor * kq_mask, float kq_scale, int il) {
    if (il < 0 || (size_t) il >= st->ring.size() || !st->ring[il]) {
        return kq_mask;
    }
    st->kq_scale[il] = kq_scale;

    const int64_t n_tokens  = q_cur->ne[2];
    // one sequence: its window is among the batch's last tokens; several: any token may be among its sequence's last
    const int64_t n_capture = st->seqs.size() == 1 ? std::min<int64_t>(n_tokens, st->params.window) : n_tokens;

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
    const int64_t n_kv   = st->n_head_kv;
    const int64_t n_cell = kq_mask->ne[0];
    auto head = std::make_unique<graph_input_head_mask>(st, l, n_tokens);
    head->mask = ggml_new_tensor_4d(ctx0, kq_mask->type, n_cell, 1, n_kv, kq_mask->ne[3]);
    ggml_set_input(head->mask);
    // KV head g's row for query heads g * group ... (g + 1) * group - 1, as the attention pairs them
    ggml_tensor * per_head = head->mask;
    if (n_head != n_kv) {
        per_head = ggml_repeat_4d(ctx0, per_head, n_cell, n_head / n_kv, n_kv, kq_mask->ne[3]);
        per_head = ggml_reshape_4d(ctx0, per_head, n_cell, 1, n_head, kq_mask->ne[3]);
    }
    res->add_input(std::move(head));
    // a decode's mask (one token per stream) broadcasts over the heads as it is; a batch's is repeated per head first
    if (kq_mask->ne[1] == 1) {
        return ggml_add(ctx0, per_head, kq_mask);
    }
    return ggml_add(ctx0, ggml_repeat_4d(ctx0, kq_mask, n_cell, kq_mask->ne[1], n_head, kq_mask->ne[3]), per_head);
}

// the sequences a call for seq_id (-1: all) covers
static std::vector<llama_seq_id> seqs_of(const llama_kv_evict_state * st, int32_t seq_id) {
    std::vector<llama_seq_id> ids;
    for (llama_seq_id s = 0; s < (llama_seq_id) st->seqs.size(); ++s) {
        if (seq_id < 0 || s == seq_id) {
            ids.push_back(s);
        }
    }
    return ids;
}

void llama_kv_evict_on_seq_rm(llama_kv_evict_state * st, int32_t seq_id, int32_t p0, int32_t p1) {
    if (st->editing || !st->kv) {
        return;
    }
    // a cell goes if a head holds a moved row of a removed token in it, or of a token past the last cell (the
    // sequence continues after its last cell, and such a row's RoPE position would lie past the next queries);
    // removing cells can lower the last cell, hence the loop
    const int64_t n_layer_kv = st->kv->get_layer_ids().size();
    for (llama_seq_id s : seqs_of(st, seq_id)) {
        kv_evict_seq & seq = st->seqs[s];
        // a token decoded at a removed position later is another token: its score goes with the removal
        for (auto it = seq.given.lower_bound(p0); it != seq.given.end() && it->first < p1;) {
            it = seq.given.erase(it);
        }
        for (bool again = true; again;) {
            const llama_pos last = st->kv->seq_pos_max(s);
            std::vector<llama_pos> drop;
            for (const auto & [pos, cell] : st->kv->get_cells(s).seq_pos_get(s)) {
                bool go = false;
                for (int64_t l = 0; l < n_layer_kv && !go; ++l) {
                    for (int64_t g = 0; g < st->n_head_kv && !go; ++g) {
                        const llama_pos e = seq.held_pos(l, cell, pos, g);
                        go = (e >= p0 && e < p1) || e > last;
                    }
                }
                if (go) {
                    drop.push_back(pos);
                }
            }
            for (llama_pos pos : drop) {
                edit_seq_rm(*st, s, pos, pos + 1);
            }
            again = !drop.empty();
        }
    }
}

void llama_kv_evict_on_seq_cp(llama_kv_evict_state * st, int32_t seq_id_src, int32_t seq_id_dst) {
    // llama.cpp copies the source's cells and rows into the destination's stream, cell for cell: the hook's
    // bookkeeping of the source goes with them, and so do the window's queries, into the destination's ring rows
    const kv_evict_seq & src = st->seqs[seq_id_src];
    kv_evict_seq & dst = st->seqs[seq_id_dst];
    const int32_t row0 = dst.ring_row0;
    dst = src;
    dst.ring_row0 = row0;
    dst.n_evictions = 0;
    dst.n_evicted   = 0;
    dst.t_evict_us  = 0;
    dst.t_phase_us  = {};
    for (ggml_tensor * ring : st->ring) {
        if (ring) {
            std::vector<uint8_t> rows(src.window * ring->nb[1]);
            ggml_backend_tensor_get(ring, rows.data(), src.ring_row0 * ring->nb[1], rows.size());
            ggml_backend_tensor_set(ring, rows.data(), dst.ring_row0 * ring->nb[1], rows.size());
        }
    }
}

static const char * const ADA_STATE_REFUSED = "the cache holds an -ada eviction's per-head mask, which llama.cpp's state "
                                              "leaves out: read llama_kv_evict_seq_get_data first and save it beside the "
                                              "state (pyllmkv.Llama.save_state does)";

void llama_kv_evict_on_state_write(const llama_kv_evict_state * st, int32_t seq_id) {
    for (llama_seq_id s : seqs_of(st, seq_id)) {
        if (st->seqs[s].any_absent && !st->seqs[s].mask_saved) {
            set_error(ERR_UNSUPPORTED, ADA_STATE_REFUSED);
            throw std::runtime_error(ADA_STATE_REFUSED);
        }
    }
}

void llama_kv_evict_on_state_read(llama_kv_evict_state * st, int32_t seq_id) {
    // the loaded cells' rows sit at their cells' positions until llama_kv_evict_seq_set_data says otherwise; the
    // captured queries belong to what the cache held before
    for (llama_seq_id s : seqs_of(st, seq_id)) {
        st->seqs[s].forget();
    }
}

void llama_kv_evict_state_free(llama_kv_evict_state * st) {
    if (st && st->kv && st->kv->kv_evict == st) {
        st->kv->kv_evict = nullptr;
    }
    delete st;
}
