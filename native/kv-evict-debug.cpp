// Debug and test entry points (llama-kv-evict-debug.h): what each head holds, the cache's rows, the captured queries,
// AdaKV's allocation alone.
#include "llama-kv-evict-debug.h"
#include "kv-evict-state.h"
#include "kv-evict-select.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <cstring>

using namespace kv_evict;

int32_t llama_kv_evict_head_positions(llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_pos * out, int32_t n_max) {
    llama_kv_evict_state * st = nullptr;
    const int32_t l = enabled_layer(ctx, seq_id, il, st);
    if (l < 0) {
        return l;
    }
    const int64_t n_kv = ctx->get_model().hparams.n_head_kv(il);
    const auto & pcs = st->kv->get_cells(seq_id).seq_pos_get(seq_id);
    const kv_evict_seq & seq = st->seqs[seq_id];
    const int64_t n = pcs.size();
    const int64_t m = std::min<int64_t>(n, n_max);
    int64_t i = 0;
    for (const auto & [pos, cell] : pcs) {
        if (i >= m) {
            break;
        }
        for (int64_t g = 0; g < n_kv; ++g) {
            out[g * m + i] = seq.held_pos(l, cell, pos, g);
        }
        ++i;
    }
    return (int32_t) n;
}

int64_t llama_kv_evict_read_rows(llama_context * ctx, llama_seq_id seq_id, int32_t il, bool is_v, void * out, size_t size) {
    llama_kv_cache * kv = nullptr;
    if (int32_t err = seq_cache(ctx, seq_id, kv)) {
        return err;
    }
    if (int32_t err = layer_index(*kv, il); err < 0) {
        return err;
    }
    settle(ctx);
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
    st->seqs[seq_id].window_slots(st->kv->seq_pos_max(seq_id), slots, q_pos);
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

int32_t llama_kv_evict_profile(llama_context * ctx, llama_seq_id seq_id, int64_t * t_us, int32_t n) {
    llama_kv_evict_state * st = enabled_state(ctx);
    if (int32_t err = check_seq(st, seq_id)) {
        return err;
    }
    const auto & t_phase = st->seqs[seq_id].t_phase_us;
    std::copy_n(t_phase.begin(), std::clamp<int32_t>(n, 0, EVICT_PHASE_COUNT), t_us);
    return EVICT_PHASE_COUNT;
}
