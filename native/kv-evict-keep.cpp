// Which cells each head keeps, by the policy's parts, and the removal of the rest: per token (one set of cells for all
// heads) or per head (rows compacted into the first cells).
#include "kv-evict-state.h"
#include "kv-evict-select.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>

namespace kv_evict {

namespace {

// Token granularity: one score per cell, the mean over layers and KV heads. Attention shares sum to one per head, so
// every head votes with equal weight; the CriticalKV second-stage products are normalised per head for the same reason
// (value norms differ by orders of magnitude between layers, and one layer would otherwise decide alone).
std::vector<uint8_t> select_token(const llama_kv_evict_params & p, const seq_scores & sc, int64_t n_layer_kv, int64_t n_kv) {
    const int64_t n_prefix = sc.n_prefix();
    const int64_t budget   = p.budget - sc.n_window;
    const policy & pol = *find_policy(p.policy);

    if (pol.score == scorer::recency) {
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
    if (pol.weigh != rescale::two_stage) {
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

} // namespace

// Token granularity: the cells select_token drops leave the full-attention cache. Only that cache: an iSWA model's
// sliding-window cache keeps its window as llama.cpp manages it
int32_t evict_tokens(llama_kv_evict_state & st, llama_seq_id seq_id, const seq_scores & sc, int64_t n_layer_kv, int64_t n_kv) {
    auto & t_phase = st.seqs[seq_id].t_phase_us;
    const int64_t t_select = ggml_time_us();
    const std::vector<uint8_t> keep = select_token(st.params, sc, n_layer_kv, n_kv);
    const int64_t t_compact = ggml_time_us();
    t_phase[EVICT_PHASE_SELECT] += t_compact - t_select;

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
    t_phase[EVICT_PHASE_COMPACT] += ggml_time_us() - t_compact;
    return n_removed;
}

// Head granularity: each (layer, KV head) keeps its own best cells by the policy's per-head rule, all heads the same
// number, or with an -ada policy its AdaKV share; their rows are compacted into the sequence's first cells
// (kv-evict-compact.cpp) and the remaining prefix cells are freed. A head whose share is shorter than the cells kept
// holds no token in the last ones: the layer's attention masks them for that head (llama_kv_evict_attn).
int32_t evict_heads(llama_kv_evict_state & st, llama_seq_id seq_id, const seq_scores & sc, int64_t n_layer_kv, int64_t n_kv) {
    const auto & p = st.params;
    kv_evict_seq & seq = st.seqs[seq_id];
    const int64_t t_select = ggml_time_us();
    const int64_t n_prefix = sc.n_prefix();
    const int64_t budget   = p.budget - sc.n_window;
    const policy & pol = st.policy();

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
    if (pol.share == allocation::layer || pol.share == allocation::model) {
        // one top-k over the pairs of every head of a layer or of every layer, with no per-head floor
        const int64_t n_heads = pol.share == allocation::model ? n_layer_kv * n_kv : n_kv;
        for (int64_t h0 = 0; h0 < n_layer_kv * n_kv; h0 += n_heads) {
            std::vector<std::vector<float>>   s(n_heads);
            std::vector<std::vector<uint8_t>> taken(n_heads);
            for (int64_t h = 0; h < n_heads; ++h) {
                s[h]     = head_scores(h0 + h);
                taken[h] = skip[h0 + h].empty() ? std::vector<uint8_t>(n_prefix, 0) : skip[h0 + h];
            }
            std::vector<int64_t> sh(n_heads, 0);
            pooled_shares(s, taken, n_heads * budget, head_share_cap(budget), sh);
            std::copy(sh.begin(), sh.end(), share.begin() + h0);
        }
    } else if (pol.share == allocation::adakv) {
        for (int64_t l = 0; l < n_layer_kv; ++l) {
            std::vector<std::vector<float>>   s(n_kv);
            std::vector<std::vector<uint8_t>> sk(n_kv);
            for (int64_t g = 0; g < n_kv; ++g) {
                s[g]  = head_scores(l * n_kv + g);
                sk[g] = skip[l * n_kv + g].empty() ? std::vector<uint8_t>(n_prefix, 0) : skip[l * n_kv + g];
            }
            const auto sh = adakv_shares(s, &sk, budget, p.ada_alpha, head_share_cap(budget));
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
        if (pol.weigh == rescale::two_stage) {
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
    const int64_t t_compact = ggml_time_us();
    seq.t_phase_us[EVICT_PHASE_SELECT] += t_compact - t_select;
    if (int32_t err = compact_heads(st, st.kv->get_stream(seq_id), dst, src)) {
        return err;
    }

    // side data moves with the rows
    std::vector<float>     norm(n_keep), acc(n_keep), probed(n_keep);
    std::vector<llama_pos> hpos(n_keep);
    for (int64_t hh = 0; hh < n_layer_kv * n_kv; ++hh) {
        const int64_t l = hh / n_kv, g = hh % n_kv;
        const int64_t k = src[hh].size();
        for (int64_t j = 0; j < k; ++j) {
            norm[j] = seq.value_norm[seq.side(l, src[hh][j], g)];
            acc[j]  = seq.attn_sum[seq.side(l, src[hh][j], g)];
            probed[j] = seq.probe_max[seq.side(l, src[hh][j], g)];
            hpos[j] = seq.head_pos[seq.side(l, src[hh][j], g)];
        }
        for (int64_t j = 0; j < n_keep; ++j) {
            const size_t at = seq.side(l, dst[j], g);
            seq.value_norm[at]  = j < k ? norm[j] : 0.0f;
            seq.attn_sum[at]    = j < k ? acc[j] : 0.0f;
            seq.probe_max[at]   = j < k ? probed[j] : 0.0f;
            seq.head_pos[at]    = j < k ? hpos[j] : -1;
            seq.head_absent[at] = j >= k;
            seq.any_absent     |= j >= k;
        }
    }
    seq.mask_saved = false;
    for (uint32_t cell : dst) {
        // the policies that weigh by value norms computed every prefix cell's; the others recompute them from the rows
        seq.norm_valid[cell] = pol.needs_value_norms();
    }

    // the destination cells are the first n_keep prefix positions: the rest of the prefix is one position range
    if (n_keep < n_prefix && !edit_seq_rm(st, seq_id, sc.pos[n_keep], sc.pos[n_prefix])) {
        return set_error(ERR_COMPUTE, "the cache refused to remove the compacted prefix");
    }
    seq.t_phase_us[EVICT_PHASE_COMPACT] += ggml_time_us() - t_compact;
    return (int32_t) (n_prefix - n_keep);
}

// Cells the sequence would hold if every head kept only the cells it holds a token in: the -ada policies are within
// budget while their (head, cell) pairs are, whatever their largest share
int64_t held_cells(const llama_kv_evict_state & st, llama_seq_id seq_id) {
    const auto & pcs = st.kv->get_cells(seq_id).seq_pos_get(seq_id);
    const kv_evict_seq & seq = st.seqs[seq_id];
    if (!seq.any_absent) {
        return pcs.size();
    }
    int64_t most = 0;
    for (int64_t l = 0; l < (int64_t) st.kv->get_layer_ids().size(); ++l) {
        int64_t pairs = 0;
        for (const auto & [pos, cell] : pcs) {
            for (int64_t g = 0; g < st.n_head_kv; ++g) {
                pairs += !seq.absent(l, cell, pos, g);
            }
        }
        most = std::max(most, (pairs + st.n_head_kv - 1) / st.n_head_kv);
    }
    return most;
}

} // namespace kv_evict
