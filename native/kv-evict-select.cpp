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
        float   first_stage_ratio) {
    const int64_t n = s.size();
    std::vector<uint8_t> keep(n, 0);
    budget = std::min(budget, n);

    const int64_t n_first = (int64_t) std::floor(budget * (double) first_stage_ratio);
    for (int64_t i : top_k(s, n_first)) {
        keep[i] = 1;
    }
    for (int64_t i : top_k(c, budget - n_first, &keep)) {
        keep[i] = 1;
    }
    return keep;
}

std::vector<uint8_t> select_top(const std::vector<float> & s, int64_t budget) {
    std::vector<uint8_t> keep(s.size(), 0);
    for (int64_t i : top_k(s, budget)) {
        keep[i] = 1;
    }
    return keep;
}

} // namespace kv_evict
