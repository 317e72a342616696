// Host-side selection rules: small arrays (cells x heads), no llama.cpp types, so they can be read beside the paper.
#pragma once

#include <cstdint>
#include <vector>

namespace kv_evict {

// SnapKV smoothing of one head's scores over cells in position order: average of `kernel` neighbours with zero
// padding, divided by `kernel` at the edges too (torch avg_pool1d with count_include_pad, as kvpress uses it).
void pool_avg(const float * x, int64_t n, int32_t kernel, float * out);

// Indices of the `k` largest values, ties broken towards the lower index (the older cell). Entries with skip[i] set
// are never chosen. Returned in descending order of value.
std::vector<int64_t> top_k(const std::vector<float> & value, int64_t k, const std::vector<uint8_t> * skip = nullptr);

// CriticalKV two-stage selection (Feng et al. 2025, Alg. 1): the first floor(budget * first_stage_ratio) cells by
// attention `s`, the rest of the budget by `c` = (s + epsilon) * |V W_O|_1 among the cells not yet chosen.
// Returns keep[i] (1 = kept); exactly min(budget, n) cells are kept.
// Cells with skip[i] set are never kept.
std::vector<uint8_t> select_two_stage(
        const std::vector<float> & s,
        const std::vector<float> & c,
        int64_t budget,
        float   first_stage_ratio,
        const std::vector<uint8_t> * skip = nullptr);

// One-stage selection: the `budget` cells of largest `s`.
std::vector<uint8_t> select_top(const std::vector<float> & s, int64_t budget, const std::vector<uint8_t> * skip = nullptr);

// DefensiveKV's scorer (Feng et al. 2025b, arXiv 2510.13334) for one layer's prefix cells, [n_kv][n_prefix], from two
// reductions of the window's attention over all n cells (the last n - n_prefix are the window's own), each
// [n_head][n]: mean[h][i], over the window's queries, and pooled_max[h][i], the maximum over the queries of each
// query's prefix row pooled and rescaled to the row's prefix mass. score [n_kv][n_prefix] gets the maximum over the query group,
// floored at that KV head's mean over cells. protect gets the flat indices (g * n_prefix + i) of the cells holding the
// first (0.9 - mass the window puts on its own cells) of a head's mean attention, at most `budget` per head: after any
// rescale they score the layer's maximum.
void window_max_scores(
        const float * mean, const float * pooled_max, int64_t n, int64_t n_prefix, int64_t n_head, int64_t n_kv,
        int64_t budget, float * score, std::vector<int64_t> & protect);

// DefensiveKV's rescale: each score [n_kv][n_prefix] times its KV head's share of the cell's value norms across the
// layer's KV heads
void norm_share(float * score, const float * value_norm /* [n_kv][n_prefix] */, int64_t n_kv, int64_t n_prefix);

// The best (head, cell) pairs of all heads, `pool` more of them, added to each head's `share`: ties to the lower head,
// then the lower cell; no head past `cap` (its surplus goes to the next pairs of the others). taken[h][i] marks pairs
// already counted or not to be chosen. DefensiveKV's one top-k over a layer's (or every layer's) heads, AdaKV's second
// part.
void pooled_shares(
        const std::vector<std::vector<float>> & s,
        const std::vector<std::vector<uint8_t>> & taken,
        int64_t pool,
        int64_t cap,
        std::vector<int64_t> & share);

// AdaKV (Feng et al. 2024): how many cells each of a layer's heads keeps, out of a pool of n_head * budget. Every
// head first gets its top max(1, floor(alpha * budget)) cells by s[h]; the rest of the pool goes to the best
// (head, cell) pairs of all heads, ties to the lower head, then the lower cell. No head gets more than `cap` cells
// (its surplus goes to the next pairs of the others). skip[h][i] (optional) marks pairs that cannot be chosen.
std::vector<int64_t> adakv_shares(
        const std::vector<std::vector<float>> & s,
        const std::vector<std::vector<uint8_t>> * skip,
        int64_t budget,
        float   alpha,
        int64_t cap);

} // namespace kv_evict
