// Fused projected-value norms for the CPU backend: n^h_i = |V_i W_O^h|_1 without materialising V W_O.
//
// W_O ([n_head*hd, n_embd], any type ggml can dequantise) is read TILE output rows at a time, dequantised into a
// per-thread tile laid out [head][dim][output], and every cell's V row meets the tile in a register-blocked
// multiply-accumulate whose results are only reduced by |.| and a sum. Threads split the cells; memory is the tile
// (n_head*hd*TILE floats per thread) plus the output, whatever the number of cells.
//
// Where W_O is quantised and the CPU has AVX-512 VNNI, the product runs in int8 as llama.cpp's own matmul does for
// such weights: W_O's rows and the V rows are rounded to 8 bits with one scale per head slice, and the int32 sums
// are scaled back before |.|.
#include "kv-evict-kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define KV_EVICT_INT8_NORMS 1
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12 warns inside its own _mm512_undefined_* (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace kv_evict {

namespace {

// The sizes of a value-norm op and this thread's share [i0, i1) of its cells, whose outputs it zeroes. dst [m, n_head]
// f32; src[0] V rows f32 [n_head_kv*hd, m]; src[1] W_O [n_head*hd, n_embd]; src[2] optional f32 per-output scale.
// The shapes give every size: hd = W_O's inputs / n_head, n_head_kv = V's row / hd.
struct norm_op {
    const ggml_tensor * v;
    const ggml_tensor * wo;
    const ggml_tensor * ws;
    int64_t n_head, hd, n_kv, group, k_in, n_out, m, i0, i1;
    float * out;

    norm_op(const ggml_tensor * dst, int ith, int nth)
        : v(dst->src[0]), wo(dst->src[1]), ws(dst->src[2]), n_head(dst->ne[1]), hd(wo->ne[0] / n_head),
          n_kv(v->ne[0] / hd), group(n_head / n_kv), k_in(wo->ne[0]), n_out(wo->ne[1]), m(v->ne[1]),
          i0(std::min<int64_t>(m, ith * ((m + nth - 1) / nth))), i1(std::min<int64_t>(m, i0 + (m + nth - 1) / nth)),
          out((float *) dst->data) {
        for (int64_t h = 0; h < n_head && i0 < i1; ++h) {
            std::fill(out + h * m + i0, out + h * m + i1, 0.0f);
        }
    }
};

constexpr int64_t TILE  = 32; // outputs per tile: CELLS x TILE accumulators fill 16 AVX registers
constexpr int64_t CELLS = 4;  // cells that share each loaded tile element

#ifdef KV_EVICT_INT8_NORMS
constexpr int64_t TILE8  = 64; // outputs per int8 tile: 4 vectors of 16 int32 sums
constexpr int64_t CELLS8 = 6;  // cells that share each loaded tile quad: 24 accumulators of the 32 registers

// Rounds x[0..n) (n a multiple of 16) times mul to int8 with one scale (max |x mul| / 127); returns the scale and
// the sum of the bytes
float quantize_row(const float * x, int64_t n, float mul, int8_t * q, int32_t & sum) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) {
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + d)));
    }
    const float a   = _mm512_reduce_max_ps(amax) * std::fabs(mul);
    const __m512 inv = _mm512_set1_ps(a > 0.0f ? 127.0f * mul / a : 0.0f);
    __m512i qsum = _mm512_setzero_si512();
    for (int64_t d = 0; d < n; d += 16) {
        const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + d), inv)); // to nearest
        qsum = _mm512_add_epi32(qsum, qi);
        _mm_storeu_si128((__m128i *) (q + d), _mm512_cvtsepi32_epi8(qi));
    }
    sum = _mm512_reduce_add_epi32(qsum);
    return a / 127.0f;
}

// The same op as value_norm_cpu in int8. The tile holds W_O's head slices as unsigned bytes (w + 128) laid out
// [head][dim / 4][output][4], as vpdpbusd multiplies 4 byte pairs per int32 lane; the V rows are signed bytes, so each
// sum carries 128 * sum(v), taken off before scaling.
void value_norm_cpu_int8(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const norm_op op(dst, ith, nth);
    const auto & [v, wo, ws, n_head, hd, n_kv, group, k_in, n_out, m, i0, i1, out] = op;
    if (i0 >= i1) {
        return;
    }
    const int64_t n_quad = hd / 4;

    // this thread's cells per KV head: bytes (zeros for the cells past the end of the last block), scale, 128 * sum
    const int64_t n_cell = i1 - i0;
    std::vector<int8_t>  vq((n_cell + CELLS8) * n_kv * hd, 0);
    std::vector<float>   v_scale(n_cell * n_kv);
    std::vector<int32_t> v_offset(n_cell * n_kv);
    for (int64_t i = 0; i < n_cell; ++i) {
        const float * row = (const float *) ((const char *) v->data + (i0 + i) * v->nb[1]);
        for (int64_t g = 0; g < n_kv; ++g) {
            int8_t * q = vq.data() + (i * n_kv + g) * hd;
            int32_t sum;
            v_scale[i * n_kv + g]  = quantize_row(row + g * hd, hd, 1.0f, q, sum);
            v_offset[i * n_kv + g] = 128 * sum;
        }
    }

    const ggml_type_traits * tt = ggml_get_type_traits(wo->type);
    std::vector<float>   row(k_in);
    std::vector<int8_t>  row_q(hd);
    std::vector<uint8_t> tile(k_in * TILE8); // [h][d / 4][output][4]
    std::vector<float>   w_scale(n_head * TILE8);

    for (int64_t j0 = 0; j0 < n_out; j0 += TILE8) {
        const int64_t nj = std::min(TILE8, n_out - j0);
        for (int64_t jj = 0; jj < TILE8; ++jj) {
            if (jj < nj) {
                tt->to_float((const char *) wo->data + (j0 + jj) * wo->nb[1], row.data(), k_in);
            }
            // a per-output scale scales the output, so it can scale the weight row instead
            const float s = jj < nj && ws ? ((const float *) ws->data)[j0 + jj] : 1.0f;
            for (int64_t h = 0; h < n_head; ++h) {
                int32_t sum;
                // an output past the end: weights 0 (bytes 128) and scale 0
                w_scale[h * TILE8 + jj] = jj < nj ? quantize_row(row.data() + h * hd, hd, s, row_q.data(), sum) : 0.0f;
                for (int64_t q = 0; q < n_quad; ++q) {
                    uint32_t quad = 0;
                    if (jj < nj) {
                        memcpy(&quad, row_q.data() + 4 * q, sizeof(quad));
                    }
                    quad ^= 0x80808080u; // + 128 in each byte
                    memcpy(tile.data() + ((h * n_quad + q) * TILE8 + jj) * 4, &quad, sizeof(quad));
                }
            }
        }

        for (int64_t h = 0; h < n_head; ++h) {
            const int64_t g = h / group;
            const uint8_t * w = tile.data() + h * n_quad * TILE8 * 4;
            __m512 scale[4];
            for (int k = 0; k < 4; ++k) {
                scale[k] = _mm512_loadu_ps(w_scale.data() + h * TILE8 + 16 * k);
            }
            for (int64_t i = 0; i < n_cell; i += CELLS8) {
                __m512i acc[CELLS8][4];
                for (int c = 0; c < CELLS8; ++c) {
                    for (int k = 0; k < 4; ++k) {
                        acc[c][k] = _mm512_setzero_si512();
                    }
                }
                for (int64_t q = 0; q < n_quad; ++q) {
                    __m512i wq[4];
                    for (int k = 0; k < 4; ++k) {
                        wq[k] = _mm512_loadu_si512(w + (q * TILE8 + 16 * k) * 4);
                    }
                    for (int c = 0; c < CELLS8; ++c) {
                        int32_t quad;
                        memcpy(&quad, vq.data() + ((i + c) * n_kv + g) * hd + 4 * q, sizeof(quad));
                        const __m512i vb = _mm512_set1_epi32(quad);
                        for (int k = 0; k < 4; ++k) {
                            acc[c][k] = _mm512_dpbusd_epi32(acc[c][k], wq[k], vb);
                        }
                    }
                }
                for (int c = 0; c < CELLS8 && i + c < n_cell; ++c) {
                    const __m512i offset = _mm512_set1_epi32(v_offset[(i + c) * n_kv + g]);
                    __m512 sum = _mm512_setzero_ps();
                    for (int k = 0; k < 4; ++k) {
                        const __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[c][k], offset));
                        sum = _mm512_add_ps(sum, _mm512_abs_ps(_mm512_mul_ps(y, scale[k])));
                    }
                    out[h * m + i0 + i + c] += v_scale[(i + c) * n_kv + g] * _mm512_reduce_add_ps(sum);
                }
            }
        }
    }
}
#endif

// The float product (the file's head says how)
void value_norm_cpu(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const norm_op op(dst, ith, nth);
    const auto & [v, wo, ws, n_head, hd, n_kv, group, k_in, n_out, m, i0, i1, out] = op;
    if (i0 >= i1) {
        return;
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

bool value_norm_cpu_int8(const ggml_tensor * wo, int64_t n_head) {
#ifdef KV_EVICT_INT8_NORMS
    return ggml_is_quantized(wo->type) && (wo->ne[0] / n_head) % 16 == 0;
#else
    (void) wo;
    (void) n_head;
    return false;
#endif
}

ggml_tensor * value_norm_cpu_op(ggml_context * ctx, ggml_tensor * v, ggml_tensor * wo, ggml_tensor * wo_s, int64_t n_head,
        bool int8) {
    ggml_tensor * args[3] = {v, wo, wo_s};
    ggml_custom_op_t op = value_norm_cpu;
#ifdef KV_EVICT_INT8_NORMS
    if (int8) {
        op = value_norm_cpu_int8;
    }
#else
    GGML_ASSERT(!int8);
#endif
    return ggml_custom_4d(ctx, GGML_TYPE_F32, v->ne[1], n_head, 1, 1, args, wo_s ? 3 : 2, op, GGML_N_TASKS_MAX, nullptr);
}

} // namespace kv_evict
