#include "kv-evict-select.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kv_evict {

void pool_avg(const float * x, int64_t n, int32_t kernel, float * out) {
    const int64_t half = kernel / 2;
    for (int64_t i = 0; i < n; ++i) {
        double sum = 0.0;
        for (int64_t j = std::max<int64_t>(0, i - half); j <= std::min<int64_t>(n - 1, i + half); ++j) {
            sum += x[j];
        }
        out[i] = (float) (sum / kernel);
    }
}

std::vector<int64_t> top_k(const std::vector<float> & value, int64_t k, const std::vector<uint8_t> * skip) {
    std::vector<int64_t> idx;
    idx.reserve(value.size());
    for (int64_t i = 0; i < (int64_t) value.size(); ++i) {
        if (!skip || !(*skip)[i]) {
            idx.push_back(i);
        }
    }
    k = std::max<int64_t>(0, std::min<int64_t>(k, idx.size()));
    // NaN would break the strict weak ordering: it ranks lowest
    auto key = [&](int64_t i) { return std::isnan(value[i]) ? -INFINITY : value[i]; };
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) {
        const float va = key(a), vb = key(b);
        return va > vb || (va == vb && a < b);
    });
    idx.resize(k);
    return idx;
}

std::vector<uint8_t> select_two_stage(
        const std::vector<float> & s,
        const std::vector<float> & c,
        int64_t budget,
        float   first_stage_ratio,
        const std::vector<uint8_t> * skip) {
    const int64_t n = s.size();
    std::vector<uint8_t> keep(n, 0);
    const int64_t n_first = (int64_t) std::floor(std::min(budget, n) * (double) first_stage_ratio);
    for (int64_t i : top_k(s, n_first, skip)) {
        keep[i] = 1;
    }
    std::vector<uint8_t> taken = keep;
    for (int64_t i = 0; skip && i < n; ++i) {
        taken[i] |= (*skip)[i];
    }
    for (int64_t i : top_k(c, budget - n_first, &taken)) {
        keep[i] = 1;
    }
    return keep;
}

std::vector<uint8_t> select_top(const std::vector<float> & s, int64_t budget, const std::vector<uint8_t> * skip) {
    std::vector<uint8_t> keep(s.size(), 0);
    for (int64_t i : top_k(s, budget, skip)) {
        keep[i] = 1;
    }
    return keep;
}

void window_max_scores(
        const float * mean, const float * pooled_max, int64_t n, int64_t n_prefix, int64_t n_head, int64_t n_kv,
        int64_t budget, float * score, std::vector<int64_t> & protect) {
    const int64_t group = n_head / n_kv;
    std::fill(score, score + n_kv * n_prefix, 0.0f);
    std::vector<double> group_mean(n_kv * n_prefix, 0.0);
    double window_mass = 0.0;
    for (int64_t h = 0; h < n_head; ++h) {
        float  * m = score + (h / group) * n_prefix;
        double * u = group_mean.data() + (h / group) * n_prefix;
        for (int64_t i = 0; i < n; ++i) {
            if (i < n_prefix) {
                m[i] = std::max(m[i], pooled_max[h * n + i]);
                u[i] += mean[h * n + i];
            } else {
                window_mass += mean[h * n + i];
            }
        }
    }
    window_mass /= (double) n_head;
    for (int64_t g = 0; g < n_kv; ++g) {
        float * m = score + g * n_prefix;
        const float floor = (float) (std::accumulate(m, m + n_prefix, 0.0) / n_prefix);
        for (int64_t i = 0; i < n_prefix; ++i) {
            m[i] = std::max(m[i], floor);
        }
    }

    // stage 1: the cells before the cumulative mean attention reaches the threshold (the one reaching it excluded)
    protect.clear();
    const double threshold = 0.9 - window_mass;
    for (int64_t g = 0; g < n_kv; ++g) {
        const double * u = group_mean.data() + g * n_prefix;
        const double total = std::accumulate(u, u + n_prefix, 0.0);
        if (!(total > 0.0)) {
            continue;
        }
        std::vector<float> ug(u, u + n_prefix);
        const std::vector<int64_t> order = top_k(ug, n_prefix);
        double cum = 0.0;
        int64_t count = 0;
        while (count < n_prefix && (cum += u[order[count]] / total) < threshold) {
            ++count;
        }
        if (count == n_prefix) {
            count = 0;  // never reached: as an arg-max over an all-false mask, nothing is protected
        }
        for (int64_t k = 0; k < std::min(count, budget); ++k) {
            protect.push_back(g * n_prefix + order[k]);
        }
    }
}

void norm_share(float * score, const float * value_norm, int64_t n_kv, int64_t n_prefix) {
    for (int64_t i = 0; i < n_prefix; ++i) {
        double norm_sum = 0.0;
        for (int64_t g = 0; g < n_kv; ++g) {
            norm_sum += value_norm[g * n_prefix + i];
        }
        for (int64_t g = 0; g < n_kv; ++g) {
            const double share = norm_sum > 0.0 ? value_norm[g * n_prefix + i] / norm_sum : 0.0;
            score[g * n_prefix + i] = (float) (score[g * n_prefix + i] * share);
        }
    }
}

void pooled_shares(
        const std::vector<std::vector<float>> & s,
        const std::vector<std::vector<uint8_t>> & taken,
        int64_t pool,
        int64_t cap,
        std::vector<int64_t> & share) {
    // every pair of all heads, best first (head-major flat index breaks ties)
    std::vector<float>   flat;
    std::vector<uint8_t> flat_skip;
    for (size_t h = 0; h < s.size(); ++h) {
        flat.insert(flat.end(), s[h].begin(), s[h].end());
        flat_skip.insert(flat_skip.end(), taken[h].begin(), taken[h].end());
    }
    std::vector<int64_t> order = top_k(flat, flat.size(), &flat_skip);
    for (size_t j = 0; j < order.size() && pool > 0; ++j) {
        int64_t h = 0;
        int64_t i = order[j];
        while (i >= (int64_t) s[h].size()) {
            i -= s[h].size();
            ++h;
        }
        if (share[h] < cap) {
            share[h]++;
            pool--;
        }
    }
}

std::vector<int64_t> adakv_shares(
        const std::vector<std::vector<float>> & s,
        const std::vector<std::vector<uint8_t>> * skip,
        int64_t budget,
        float   alpha,
        int64_t cap) {
    const int64_t n_head = s.size();
    const int64_t n_safe = std::min<int64_t>(std::max<int64_t>(1, (int64_t) std::floor(alpha * budget)), cap);

    std::vector<int64_t> share(n_head, 0);
    std::vector<std::vector<uint8_t>> taken(n_head);
    int64_t left = n_head * budget;
    for (int64_t h = 0; h < n_head; ++h) {
        taken[h] = skip ? (*skip)[h] : std::vector<uint8_t>(s[h].size(), 0);
        for (int64_t i : top_k(s[h], n_safe, &taken[h])) {
            taken[h][i] = 1;
            share[h]++;
            left--;
        }
    }

    pooled_shares(s, taken, left, cap, share);
    return share;
}

} // namespace kv_evict
