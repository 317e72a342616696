// A small ggml graph run on the context's backends by the hook's own scheduler (scoring, compaction).
#pragma once

#include "kv-evict-state.h"

#include <algorithm>
#include <cstring>
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
        std::vector<uint8_t> bytes(ggml_nbytes(t));
        memcpy(bytes.data(), data.data(), bytes.size());
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

} // namespace kv_evict
