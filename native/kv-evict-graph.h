// A small ggml graph run on the context's backends by the hook's own scheduler (scoring, compaction).
#pragma once

#include "kv-evict-state.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <functional>
#include <utility>
#include <vector>

namespace kv_evict {

// A graph with its own small tensor context; inputs are set after the scheduler allocated them.
struct evict_graph {
    ggml_context_ptr ctx;
    ggml_cgraph    * gf = nullptr;
    std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> inputs;

    explicit evict_graph(int32_t graph_size) {
        ggml_init_params ip = {
            /*.mem_size   =*/ ggml_tensor_overhead() * graph_size + ggml_graph_overhead_custom(graph_size, false),
            /*.mem_buffer =*/ nullptr,
            /*.no_alloc   =*/ true,
        };
        ctx.reset(ggml_init(ip));
        gf = ggml_new_graph_custom(ctx.get(), graph_size, false);
    }

    template <typename T>
    ggml_tensor * input(ggml_type type, int64_t ne0, int64_t ne1, const std::vector<T> & data) {
        ggml_tensor * t = ggml_new_tensor_2d(ctx.get(), type, ne0, ne1);
        ggml_set_input(t);
        GGML_ASSERT(ggml_nbytes(t) == data.size() * sizeof(T));
        std::vector<uint8_t> bytes(data.size() * sizeof(T));
        if (!bytes.empty()) {
            memcpy(bytes.data(), data.data(), bytes.size());
        }
        inputs.emplace_back(t, std::move(bytes));
        return t;
    }

    // marks t as a result to read back after compute() and adds it to the graph
    ggml_tensor * output(ggml_tensor * t) {
        ggml_set_output(t);
        ggml_build_forward_expand(gf, t);
        return t;
    }

    // inputs filled by llama.cpp itself (e.g. its Hadamard matrix), after allocation
    std::vector<std::function<void()>> fillers;

    // returns false if the scheduler cannot allocate or compute the graph
    bool compute(llama_kv_evict_state & st) {
        ggml_backend_sched_t sched = st.sched.get();
        ggml_backend_sched_reset(sched);
        if (!ggml_backend_sched_alloc_graph(sched, gf)) {
            return false;
        }
        size_t buffers = 0;
        for (int i = 0; i < ggml_backend_sched_get_n_backends(sched); ++i) {
            buffers += ggml_backend_sched_get_buffer_size(sched, ggml_backend_sched_get_backend(sched, i));
        }
        st.scoring_bytes = std::max(st.scoring_bytes, buffers);
        for (auto & [t, bytes] : inputs) {
            ggml_backend_tensor_set(t, bytes.data(), 0, bytes.size());
        }
        for (auto & fill : fillers) {
            fill();
        }
        return ggml_backend_sched_graph_compute(sched, gf) == GGML_STATUS_SUCCESS;
    }
};

// Creates (or grows) the hook's scheduler over the context's backends
int32_t ensure_sched(llama_kv_evict_state & st, int32_t graph_size);

// A stream's rows of a cache tensor stored per cell ([n_embd_gqa, kv_size, n_stream])
inline ggml_tensor * stream_rows(ggml_context * ctx, ggml_tensor * cache, uint32_t stream) {
    return ggml_view_2d(ctx, cache, cache->ne[0], cache->ne[1], cache->nb[1], stream * cache->nb[2]);
}

// The sequence's rows of such a cache tensor, gathered as f32
inline ggml_tensor * gather_rows(ggml_context * ctx, ggml_tensor * cache, uint32_t stream, ggml_tensor * cell_idx) {
    return ggml_get_rows(ctx, stream_rows(ctx, cache, stream), cell_idx);
}

// Whether the environment variable `name` asks for plain ggml ops (tests and benchmarks compare them with the fused
// kernels)
inline bool graph_forced(const char * name) {
    const char * force = getenv(name);
    return force && std::string(force) == "graph";
}

// |V_i W_O^h|_1 for the given cells, per layer and query head, then averaged over each KV head's query group
int32_t compute_value_norms(llama_kv_evict_state & st, uint32_t stream, const std::vector<uint32_t> & cells,
        std::vector<std::vector<float>> & norms /* [layer_kv][cell * n_head_kv + g] */);

// KNorm's scores of the sequence's prefix cells (out.pos, out.cells, out.n_window set): -|K_i|_2 per layer and KV head
int32_t key_norm_scores(llama_kv_evict_state & st, uint32_t stream, seq_scores & out);

} // namespace kv_evict
