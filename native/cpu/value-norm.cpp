// Fused projected-value norms for the CPU backend: n^h_i = |V_i W_O^h|_1 without materialising V W_O.
//
// W_O ([n_head*hd, n_embd], any type ggml can dequantise) is read TILE output rows at a time, dequantised into a
// per-thread tile laid out [head][dim][output], and every cell's V row meets the tile in a register-blocked
// multiply-accumulate whose results are only reduced by |.| and a sum. Threads split the cells; memory is the tile
// (n_head*hd*TILE floats per thread) plus the output, whatever the number of cells.
#include "kv-evict-kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace kv_evict {

namespace {

constexpr int64_t TILE  = 32; // outputs per tile: CELLS x TILE accumulators fill 16 AVX registers
constexpr int64_t CELLS = 4;  // cells that share each loaded tile element

// dst [m, n_head] f32; src[0] V rows f32 [n_head_kv*hd, m]; src[1] W_O [n_head*hd, n_embd]; src[2] optional f32
// per-output scale. The shapes give every size: hd = W_O's inputs / n_head, n_head_kv = V's row / hd.
void value_norm_cpu(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * v  = dst->src[0];
    const ggml_tensor * wo = dst->src[1];
    const ggml_tensor * ws = dst->src[2];
    const int64_t n_head = dst->ne[1];
    const int64_t hd     = wo->ne[0] / n_head;
    const int64_t group  = n_head / (v->ne[0] / hd);
    const int64_t k_in   = wo->ne[0];
    const int64_t n_out = wo->ne[1];
    const int64_t m     = v->ne[1];

    const int64_t per = (m + nth - 1) / nth;
    const int64_t i0  = std::min<int64_t>(m, ith * per);
    const int64_t i1  = std::min<int64_t>(m, i0 + per);
    if (i0 >= i1) {
        return;
    }
    float * out = (float *) dst->data;
    for (int64_t h = 0; h < n_head; ++h) {
        std::fill(out + h * m + i0, out + h * m + i1, 0.0f);
    }

    const ggml_type_traits * tt = ggml_get_type_traits(wo->type);
    std::vector<float> row(k_in);
    std::vector<float> tile(k_in * TILE);            // [h][d][output]
    const std::vector<float> zero(v->ne[0], 0.0f);   // stands in for the cells past the end of a block

    for (int64_t j0 = 0; j0 < n_out; j0 += TILE) {
        const int64_t nj = std::min(TILE, n_out - j0);
        for (int64_t jj = 0; jj < TILE; ++jj) {
            if (jj < nj) {
                const char * src = (const char *) wo->data + (j0 + jj) * wo->nb[1];
                if (wo->type == GGML_TYPE_F32) {
                    memcpy(row.data(), src, k_in * sizeof(float));
                } else {
                    tt->to_float(src, row.data(), k_in);
                }
                // a per-output scale scales the output, so it can scale the weight row instead
                const float s = ws ? ((const float *) ws->data)[j0 + jj] : 1.0f;
                for (int64_t k = 0; k < k_in; ++k) {
                    tile[k * TILE + jj] = row[k] * s;
                }
            } else {
                for (int64_t k = 0; k < k_in; ++k) {
                    tile[k * TILE + jj] = 0.0f; // |0| adds nothing
                }
            }
        }

        for (int64_t i = i0; i < i1; i += CELLS) {
            const float * vc[CELLS];
            for (int64_t c = 0; c < CELLS; ++c) {
                vc[c] = i + c < i1 ? (const float *) ((const char *) v->data + (i + c) * v->nb[1]) : zero.data();
            }
            for (int64_t h = 0; h < n_head; ++h) {
                const int64_t off = (h / group) * hd;
                const float * w = tile.data() + h * hd * TILE;
                float y[CELLS][TILE] = {};
                for (int64_t d = 0; d < hd; ++d) {
                    const float * wd = w + d * TILE;
                    for (int64_t c = 0; c < CELLS; ++c) {
                        const float vd = vc[c][off + d];
                        for (int64_t jj = 0; jj < TILE; ++jj) {
                            y[c][jj] += wd[jj] * vd;
                        }
                    }
                }
                for (int64_t c = 0; c < CELLS && i + c < i1; ++c) {
                    float s = 0.0f;
                    for (int64_t jj = 0; jj < TILE; ++jj) {
                        s += std::fabs(y[c][jj]);
                    }
                    out[h * m + i + c] += s;
                }
            }
        }
    }
}

} // namespace

bool value_norm_cpu_supports(const ggml_tensor * wo, const ggml_tensor * wo_s) {
    // plain host memory in ggml's own row layout: the CPU's repacked weight buffers (CPU_REPACK ...) interleave rows
    auto plain_cpu = [](const ggml_tensor * t) {
        if (!t->buffer || !ggml_backend_buffer_is_host(t->buffer)) {
            return false;
        }
        const std::string name = ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer));
        return name == "CPU" || name == "CPU_Mapped";
    };
    const ggml_type_traits * tt = ggml_get_type_traits(wo->type);
    return plain_cpu(wo) && (wo->type == GGML_TYPE_F32 || tt->to_float) && ggml_is_contiguous(wo) &&
           (!wo_s || (plain_cpu(wo_s) && wo_s->type == GGML_TYPE_F32 && ggml_nelements(wo_s) == wo->ne[1]));
}

ggml_tensor * value_norm_cpu_op(ggml_context * ctx, ggml_tensor * v, ggml_tensor * wo, ggml_tensor * wo_s, int64_t n_head) {
    ggml_tensor * args[3] = {v, wo, wo_s};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, v->ne[1], n_head, 1, 1, args, wo_s ? 3 : 2, value_norm_cpu, GGML_N_TASKS_MAX, nullptr);
}

} // namespace kv_evict
