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
