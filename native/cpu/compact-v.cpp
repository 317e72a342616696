// Head-wise compaction of a transposed V cache on the CPU. Stored transposed, each dimension of a head is one row of
// kv_size cells, so a head's kept cells move along its rows in place; the ggml graph instead transposes every head's
// whole slab into a copy and back, which made compaction most of snapkv's eviction time on CPU.

#include "kv-evict-kernels.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace kv_evict {

namespace {

template <typename T>
void move_cells(char * row, const std::vector<uint32_t> & src, const std::vector<int64_t> & dst, std::vector<T> & tmp) {
    T * cells = (T *) row;
    tmp.resize(src.size());
    for (size_t j = 0; j < src.size(); ++j) {
        tmp[j] = cells[src[j]];
    }
    for (size_t j = 0; j < src.size(); ++j) {
        cells[dst[j]] = tmp[j];
    }
}

void compact_v_trans_cpu(ggml_tensor * out, int ith, int nth, void * userdata) {
    const auto * args = (const compact_v_args *) userdata;
    const ggml_tensor * v = out->src[0];
    const size_t  row     = ggml_row_size(v->type, v->ne[1]); // one dimension's kv_size cells
    const int64_t n_rows  = args->n_head_kv * args->head_dim;
    const int64_t per     = (n_rows + nth - 1) / nth;
    char * base = (char *) v->data + args->stream * v->nb[2];
    std::vector<uint16_t> tmp16;
    std::vector<uint32_t> tmp32;
    for (int64_t r = ith * per; r < std::min(n_rows, (ith + 1) * per); ++r) {
        const std::vector<uint32_t> & src = args->src[r / args->head_dim];
        if (ggml_type_size(v->type) == 2) {
            move_cells(base + r * row, src, *args->dst, tmp16);
        } else {
            move_cells(base + r * row, src, *args->dst, tmp32);
        }
    }
}

} // namespace

bool compact_v_trans_cpu_supports(const ggml_tensor * v) {
    return v->buffer && ggml_backend_buffer_is_host(v->buffer) &&
           (v->type == GGML_TYPE_F32 || v->type == GGML_TYPE_F16 || v->type == GGML_TYPE_BF16);
}

ggml_tensor * compact_v_trans_cpu_op(ggml_context * ctx, ggml_tensor * v, compact_v_args * args) {
    ggml_tensor * srcs[1] = {v};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, srcs, 1, compact_v_trans_cpu, GGML_N_TASKS_MAX, args);
}

} // namespace kv_evict
