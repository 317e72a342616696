// What a llama.cpp state of a sequence leaves out (per-head positions, H2O sums, the window's queries), read and
// written beside it; and the window's queries alone, for a prompt's tail.
#include "kv-evict-state.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

using namespace kv_evict;

// llama_kv_evict_seq_get_data's layout: this header; the cells' positions [n_cells]; the position RoPE gave each head's
// row [n_layer_kv][n_cells][n_head_kv] (llama_pos), its attention sum (H2O's or the repeat probes') and the probes'
// maximum (f32, same shape each); the caller's score of each cell's token [n_cells] (f32, NaN where none); the window's
// captured positions [n_query]; then per layer of the cache their queries [n_query][n_embd_q] (f32)
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
static constexpr uint32_t SEQ_DATA_VERSION = 3;

// bytes of one query across the layers of the evicted cache, as the window's queries are read and written
static size_t query_bytes(const llama_kv_evict_state & st) {
    size_t n = 0;
    for (int32_t il : st.kv->get_layer_ids()) {
        n += st.ring[il]->nb[1];
    }
    return n;
}

// the queries of the given ring rows, per layer of the cache [n_rows][n_embd_q] f32, to w; returns the end
static uint8_t * get_queries(const llama_kv_evict_state & st, const std::vector<int32_t> & rows, uint8_t * w) {
    for (int32_t il : st.kv->get_layer_ids()) {
        for (int32_t s : rows) {
            ggml_backend_tensor_get(st.ring[il], w, s * st.ring[il]->nb[1], st.ring[il]->nb[1]);
            w += st.ring[il]->nb[1];
        }
    }
    return w;
}

// makes q_pos the captured positions of seq (its ring rows hold nothing else) and their queries those at r, laid out
// as get_queries
static void set_queries(const llama_kv_evict_state & st, kv_evict_seq & seq, const std::vector<llama_pos> & q_pos, const uint8_t * r) {
    std::fill(seq.slot_pos.begin(), seq.slot_pos.end(), -1);
    for (llama_pos p : q_pos) {
        seq.slot_pos[seq.slot(p)] = p;
    }
    for (int32_t il : st.kv->get_layer_ids()) {
        for (llama_pos p : q_pos) {
            ggml_backend_tensor_set(st.ring[il], r, (seq.ring_row0 + seq.slot(p)) * st.ring[il]->nb[1], st.ring[il]->nb[1]);
            r += st.ring[il]->nb[1];
        }
    }
}

static size_t seq_data_size(const llama_kv_evict_state & st, const seq_data_header & h) {
    const size_t side = (size_t) h.n_layer_kv * h.n_cells * h.n_head_kv;
    return sizeof(h) + sizeof(llama_pos) * (h.n_cells + side + h.n_query) + sizeof(float) * (2 * side + h.n_cells) + h.n_query * query_bytes(st);
}

int64_t llama_kv_evict_seq_get_data(llama_context * ctx, llama_seq_id seq_id, void * out, size_t size) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    ctx->synchronize();
    kv_evict_seq & seq = st->seqs[seq_id];
    const auto & pcs = st->kv->get_cells(seq_id).seq_pos_get(seq_id);
    std::vector<int32_t>   slots;
    std::vector<llama_pos> q_pos;
    seq.window_slots(pcs.empty() ? -1 : pcs.rbegin()->first, slots, q_pos);
    const auto layer_ids = st->kv->get_layer_ids();
    const seq_data_header h = { SEQ_DATA_MAGIC, SEQ_DATA_VERSION, (int32_t) layer_ids.size(), (int32_t) st->n_head_kv,
                                (int32_t) pcs.size(), (int32_t) q_pos.size(), seq.h2o_last };
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
                const llama_pos e = seq.held_pos(l, cell, pos, g);
                put(&e, sizeof(e));
            }
        }
    }
    for (const std::vector<float> * kept : {&seq.attn_sum, &seq.probe_max}) {
        for (int64_t l = 0; l < h.n_layer_kv; ++l) {
            for (const auto & [pos, cell] : pcs) {
                for (int64_t g = 0; g < h.n_head_kv; ++g) {
                    const float v = seq.holds_new_token(cell, pos) ? 0.0f : (*kept)[seq.side(l, cell, g)];
                    put(&v, sizeof(v));
                }
            }
        }
    }
    for (const auto & pc : pcs) {
        const auto it = seq.given.find(pc.first);
        const float v = it == seq.given.end() ? NAN : it->second;
        put(&v, sizeof(v));
    }
    put(q_pos.data(), q_pos.size() * sizeof(llama_pos));
    get_queries(*st, slots, w);
    seq.mask_saved = true;
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
    std::vector<float>     attn_sum(side), probe_max(side), given(h.n_cells);
    auto read_into = [&r](void * dst, size_t n) {
        if (n > 0) {
            std::memcpy(dst, r, n);
            r += n;
        }
    };
    read_into(pos.data(), pos.size() * sizeof(llama_pos));
    read_into(head_pos.data(), side * sizeof(llama_pos));
    read_into(attn_sum.data(), side * sizeof(float));
    read_into(probe_max.data(), side * sizeof(float));
    read_into(given.data(), given.size() * sizeof(float));
    read_into(q_pos.data(), q_pos.size() * sizeof(llama_pos));

    ctx->synchronize();
    kv_evict_seq & seq = st->seqs[seq_id];
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
    seq.any_absent = false;
    seq.given.clear();
    for (const auto & [p, cell] : pcs) {
        if (!std::isnan(given[i])) {
            seq.given[p] = given[i];
        }
        seq.side_pos[cell]   = p;
        seq.norm_valid[cell] = 0;
        for (int64_t l = 0; l < h.n_layer_kv; ++l) {
            for (int64_t g = 0; g < h.n_head_kv; ++g) {
                const size_t at = seq.side(l, cell, g), from = (l * h.n_cells + i) * h.n_head_kv + g;
                seq.head_pos[at]    = head_pos[from];
                seq.attn_sum[at]    = attn_sum[from];
                seq.probe_max[at]   = probe_max[from];
                seq.head_absent[at] = head_pos[from] == -1;
                seq.any_absent     |= head_pos[from] == -1;
            }
        }
        ++i;
    }
    seq.min_written = pos_max + 1;
    seq.h2o_last    = h.h2o_last;
    seq.mask_saved  = false; // a state written from here is saved beside data read again
    set_queries(*st, seq, q_pos, r);
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
    st->seqs[seq_id].window_slots(st->kv->seq_pos_max(seq_id), slots, q_pos);
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
    set_queries(*st, st->seqs[seq_id], q_pos, static_cast<const uint8_t *>(data));
    return 0;
}
