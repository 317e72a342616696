// The table of policies: one line each, the parts named in kv-evict-policy.h.
#include "kv-evict-policy.h"

namespace kv_evict {

namespace {

const policy TABLE[] = {
    {LLAMA_KV_EVICT_POLICY_CRITICALKV,        "criticalkv",        scorer::window_mean, rescale::two_stage,  allocation::uniform},
    {LLAMA_KV_EVICT_POLICY_SNAPKV,            "snapkv",            scorer::window_mean, rescale::none,       allocation::uniform},
    {LLAMA_KV_EVICT_POLICY_H2O,               "h2o",               scorer::accumulated, rescale::none,       allocation::uniform},
    {LLAMA_KV_EVICT_POLICY_TOVA,              "tova",              scorer::last_query,  rescale::none,       allocation::uniform},
    {LLAMA_KV_EVICT_POLICY_STREAMING,         "streaming",         scorer::recency,     rescale::none,       allocation::uniform},
    {LLAMA_KV_EVICT_POLICY_CRITICALKV_ADA,    "criticalkv-ada",    scorer::window_mean, rescale::two_stage,  allocation::adakv},
    {LLAMA_KV_EVICT_POLICY_SNAPKV_ADA,        "snapkv-ada",        scorer::window_mean, rescale::none,       allocation::adakv},
    {LLAMA_KV_EVICT_POLICY_DEFENSIVEKV,       "defensivekv",       scorer::window_max,  rescale::norm_share, allocation::layer},
    {LLAMA_KV_EVICT_POLICY_DEFENSIVEKV_LAYER, "defensivekv-layer", scorer::window_max,  rescale::norm_share, allocation::model},
    {LLAMA_KV_EVICT_POLICY_KNORM,             "knorm",             scorer::key_norm,    rescale::none,       allocation::uniform},
    {LLAMA_KV_EVICT_POLICY_SURPRISAL,         "surprisal",         scorer::given,       rescale::none,       allocation::uniform},
    {LLAMA_KV_EVICT_POLICY_DEFENSIVEKV_SURPRISAL, "defensivekv-surprisal", scorer::window_max, rescale::norm_share, allocation::uniform, 0.5f},
};
constexpr int32_t N_POLICIES = sizeof(TABLE) / sizeof(TABLE[0]);

} // namespace

const policy * find_policy(int32_t id) {
    return id >= 0 && id < N_POLICIES && TABLE[id].id == id ? &TABLE[id] : nullptr;
}

const policy * policies(int32_t & n) {
    n = N_POLICIES;
    return TABLE;
}

const char * name(scorer s) {
    switch (s) {
        case scorer::recency:     return "recency";
        case scorer::window_mean: return "window-mean";
        case scorer::last_query:  return "last-query";
        case scorer::accumulated: return "accumulated";
        case scorer::window_max:  return "window-max";
        case scorer::key_norm:    return "key-norm";
        case scorer::given:       return "given";
    }
    return "?";
}

const char * name(rescale r) {
    switch (r) {
        case rescale::none:       return "none";
        case rescale::two_stage:  return "two-stage";
        case rescale::norm_share: return "norm-share";
    }
    return "?";
}

const char * name(allocation a) {
    switch (a) {
        case allocation::uniform: return "uniform";
        case allocation::adakv:   return "adakv";
        case allocation::layer:   return "layer";
        case allocation::model:   return "model";
    }
    return "?";
}

} // namespace kv_evict
