// llama-server's hook points (patches/0002) on pyllmkv's public C API: each slot is a sequence with its own cells.

#include "llama-kv-evict-server.h"

#include "log.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>

namespace {

// one server, one target context: what LLAMA_KV_EVICT asked for, and the context it was enabled on
struct server_evict {
    bool                   on    = false;
    llama_kv_evict_params  params{};
    int32_t                cells = 0; // most cells a sequence keeps after an eviction
    const llama_context  * ctx   = nullptr;
};

server_evict g_evict;

bool parse_policy(const std::string & name, llama_kv_evict_policy & out, std::string & names) {
    llama_kv_evict_policy_info info{};
    const int32_t n = llama_kv_evict_policy_describe(0, &info);
    for (int32_t p = 0; p < n; p++) {
        llama_kv_evict_policy_describe(p, &info);
        if (std::string(info.scorer) == "given" || info.given_share > 0.0f) {
            continue; // scored by the caller from every token's logits (surprisal), which llama-server does not compute
        }
        names += (names.empty() ? "" : ", ") + std::string(info.name);
        if (name == info.name) {
            out = (llama_kv_evict_policy) p;
            return true;
        }
    }
    return false;
}

// "budget=1024 policy=criticalkv" (spaces or commas between fields) into params; false with the reason in err
bool parse_params(const char * text, llama_kv_evict_params & params, std::string & err) {
    params = llama_kv_evict_default_params();
    std::string spec(text);
    std::replace(spec.begin(), spec.end(), ',', ' ');
    std::istringstream fields(spec);
    std::string field;
    while (fields >> field) {
        const size_t eq = field.find('=');
        const std::string key = field.substr(0, eq);
        const std::string val = eq == std::string::npos ? "" : field.substr(eq + 1);
        try {
            if (key == "policy") {
                std::string names;
                if (!parse_policy(val, params.policy, names)) {
                    err = "unknown policy '" + val + "': choose one of " + names;
                    return false;
                }
            } else if (key == "granularity") {
                if (val != "token" && val != "head") {
                    err = "unknown granularity '" + val + "': choose token or head";
                    return false;
                }
                params.granularity = val == "head" ? LLAMA_KV_EVICT_GRANULARITY_HEAD : LLAMA_KV_EVICT_GRANULARITY_TOKEN;
            } else if (key == "budget")            { params.budget            = std::stoi(val);
            } else if (key == "window")            { params.window            = std::stoi(val);
            } else if (key == "pool_kernel")       { params.pool_kernel       = std::stoi(val);
            } else if (key == "n_sink")            { params.n_sink            = std::stoi(val);
            } else if (key == "first_stage_ratio") { params.first_stage_ratio = std::stof(val);
            } else if (key == "epsilon")           { params.epsilon           = std::stof(val);
            } else if (key == "ada_alpha")         { params.ada_alpha         = std::stof(val);
            } else {
                err = "unknown field '" + key + "': the fields are policy, granularity, budget, window, pool_kernel, "
                      "first_stage_ratio, epsilon, n_sink, ada_alpha";
                return false;
            }
        } catch (const std::exception &) {
            err = "field '" + key + "' needs a number, got '" + val + "'";
            return false;
        }
    }
    return true;
}

int32_t seq_cells(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_evict_stats st{};
    if (llama_kv_evict_get_stats(ctx, seq_id, &st) < 0) {
        throw std::runtime_error(std::string("kv_evict: ") + llama_kv_evict_last_error());
    }
    return st.n_seq_cells;
}

} // namespace

bool llama_kv_evict_server_params(common_params & params) {
    const char * spec = std::getenv("LLAMA_KV_EVICT");
    if (spec == nullptr || *spec == '\0') {
        return true;
    }
    std::string err;
    if (!parse_params(spec, g_evict.params, err)) {
        LOG_ERR("kv_evict: LLAMA_KV_EVICT=\"%s\": %s\n", spec, err.c_str());
        return false;
    }
    g_evict.cells = llama_kv_evict_max_cells(&g_evict.params);
    if (g_evict.cells < 0) {
        LOG_ERR("kv_evict: LLAMA_KV_EVICT=\"%s\": %s\n", spec, llama_kv_evict_last_error());
        return false;
    }
    g_evict.on = true;
    // each slot's stream holds what an eviction keeps plus one batch of new tokens; a larger -c stays (a sliding-window
    // model's window cache needs n_swa + n_batch cells per slot)
    const int32_t n_slots = std::max(1, params.n_parallel);
    params.kv_unified    = false;
    params.n_ctx         = std::max(params.n_ctx, n_slots * (g_evict.cells + params.n_batch));
    params.ctx_shift     = false;
    params.cache_ram_mib = 0;
    LOG_INF("kv_evict: %d slots of %d cells each (%d kept + n_batch %d), %s\n", n_slots, params.n_ctx / n_slots,
            g_evict.cells, params.n_batch, spec);
    return true;
}

bool llama_kv_evict_server_enable(llama_context * ctx) {
    if (!g_evict.on) {
        return true;
    }
    if (llama_kv_evict_enable(ctx, &g_evict.params) < 0) {
        LOG_ERR("kv_evict: %s\n", llama_kv_evict_last_error());
        return false;
    }
    g_evict.ctx = ctx;
    return true;
}

int32_t llama_kv_evict_server_n_ctx_slot(const llama_context * ctx, const llama_model * model, int32_t n_ctx_slot) {
    return g_evict.on && ctx == g_evict.ctx ? llama_model_n_ctx_train(model) : n_ctx_slot;
}

int32_t llama_kv_evict_server_resume_at(llama_context * ctx, llama_seq_id seq_id, int32_t n_past) {
    if (!g_evict.on || ctx != g_evict.ctx) {
        return n_past;
    }
    llama_memory_t mem = llama_get_memory(ctx);
    llama_memory_seq_rm(mem, seq_id, n_past, -1);
    return std::min(n_past, llama_memory_seq_pos_max(mem, seq_id) + 1);
}

void llama_kv_evict_server_make_room(llama_context * ctx, const common_batch & batch) {
    if (!g_evict.on || ctx != g_evict.ctx) {
        return;
    }
    std::map<llama_seq_id, int32_t> n_new;
    for (const auto & t : batch.tokens) {
        n_new[t.seq_id]++;
        for (llama_seq_id s : t.seq_ids_extra) {
            n_new[s]++;
        }
    }
    const int32_t n_batch = (int32_t) llama_n_batch(ctx);
    for (const auto & [seq_id, n] : n_new) {
        const int32_t before = seq_cells(ctx, seq_id);
        if (before + n <= g_evict.cells + n_batch) {
            continue;
        }
        if (llama_kv_evict(ctx, seq_id) < 0) {
            throw std::runtime_error(std::string("kv_evict: ") + llama_kv_evict_last_error());
        }
        LOG_INF("kv_evict: seq %d: %d -> %d cells\n", seq_id, before, seq_cells(ctx, seq_id));
    }
}
