// Fused window attention for the CPU backend: per query head, the softmax attention of the observation window's
// queries over the sequence's cells, summed with the queries' weights, without materialising [cells, queries, heads].
//
// Threads split the query heads, so each owns its output rows. A thread reads a KV head's slice of 2 cells' K rows at a
// time in the cache's own type (f16, bf16, q8_0, q4_0 ...), dequantises them once for all its query heads of that KV
// head, and multiplies them with 32 queries at a time (stored transposed) in a register-blocked loop; the logits are
// kept [cell][query], so the softmax runs over 8 queries per vector. Its memory is those heads' logits and the mask
// (queries x cells floats each), however many layers there are. Queries of weight 0 (all but the last for TOVA, those
// already counted for H2O) are not computed at all. For DefensiveKV the same pass also keeps each cell's maximum over
// the queries of their pooled rows, so no [cells, queries, heads] tensor leaves the kernel either. Written with
// GCC/Clang vector extensions; other compilers use the ggml graph.
#include "kv-evict-kernels.h"

#include <algorithm>
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <vector>

namespace kv_evict {

#if defined(__GNUC__) // GCC and Clang
namespace {

// 8 floats that GCC and Clang keep in one AVX register (two SSE/NEON ones elsewhere), for the register-blocked loop
// (aligned(4): it may be read from any float, as one unaligned load)
typedef float    f32x8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t  i32x8 __attribute__((vector_size(32), aligned(4)));
typedef uint32_t u32x8 __attribute__((vector_size(32), aligned(4)));

constexpr int64_t CELLS    = 2;  // cells per block: 2 x 32 accumulators in 8 AVX registers
constexpr int64_t PREFETCH = 16; // cells ahead whose K rows are fetched

inline f32x8 splat(float x) {
    return f32x8{} + x;
}

// a where mask (a comparison's result) is set, else b
inline f32x8 select(i32x8 mask, f32x8 a, f32x8 b) {
    return (f32x8) (((i32x8) a & mask) | ((i32x8) b & ~mask));
}

// e^x for x <= 0 (logits less their max), 0 below -87 (and for -inf, a masked cell): 2^n * p(r) with n = round(x /
// ln 2), r = x - n ln 2 in two parts and p a degree-6 Taylor polynomial (relative error ~2e-7), 8 lanes at once
inline f32x8 exp_neg(f32x8 x) {
    const i32x8 normal = x >= splat(-87.0f); // 2^n stays a normal float
    x = select(normal, x, splat(-87.0f));
    const f32x8 n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; // adding 1.5 * 2^23 rounds to an integer
    const f32x8 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    f32x8 p = splat(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const u32x8 bits = (u32x8) p + ((u32x8) __builtin_convertvector(n, i32x8) << 23); // times 2^n (wraps: n < 0)
    return (f32x8) ((i32x8) bits & normal);
}

// n values of a K row in the cache's type as f32. ggml-base's f16 routine converts one value at a time (the CPU
// backend's SIMD one is not ours to link), so f16 and bf16 convert here; other types with ggml's own routine
inline void row_to_f32(ggml_type type, const char * src, float * dst, int64_t n) {
    int64_t i = 0;
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    if (type == GGML_TYPE_BF16) {
        for (; i < n; ++i) { // bf16 is the upper half of an f32
            const uint32_t bits = (uint32_t) ((const uint16_t *) src)[i] << 16;
            memcpy(dst + i, &bits, sizeof(float));
        }
        return;
    }
#ifdef __F16C__
    if (type == GGML_TYPE_F16) {
        for (; i + 8 <= n; i += 8) {
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (src + i * sizeof(ggml_fp16_t)))));
        }
    }
#endif
    ggml_get_type_traits(type)->to_float(src + ggml_row_size(type, i), dst + i, n - i);
}

// The logits of CELLS cells (rows: their K slices, f32) for the queries a0 .. a0 + 8 QV of one head (qt: [dim][query],
// scaled), plus the causal and head masks, into logits [cell][query]; QV vectors of queries are loaded once per
// dimension and the accumulators stay in registers
template <int QV>
void logits_block(const float * qt, const float * rows, const float * causal, const float * head_mask, float * logits,
        int64_t A, int64_t a0, int64_t hd, int64_t i0, int64_t nc) {
    f32x8 acc[CELLS][QV] = {};
    for (int64_t d = 0; d < hd; ++d) {
        f32x8 qd[QV];
        for (int v = 0; v < QV; ++v) {
            qd[v] = ((const f32x8 *) (qt + d * A + a0))[v];
        }
        for (int64_t c = 0; c < CELLS; ++c) {
            const float kd = rows[c * hd + d];
            for (int v = 0; v < QV; ++v) {
                acc[c][v] += kd * qd[v];
            }
        }
    }
    for (int64_t c = 0; c < nc; ++c) {
        const int64_t i = i0 + c;
        f32x8 * l = (f32x8 *) (logits + i * A + a0);
        const f32x8 * cm = (const f32x8 *) (causal + i * A + a0);
        const float extra = head_mask ? head_mask[i] : 0.0f;
        for (int v = 0; v < QV; ++v) {
            l[v] = acc[c][v] + cm[v] + extra;
        }
    }
}

inline float hmax(f32x8 x) {
    return std::max(std::max(std::max(x[0], x[1]), std::max(x[2], x[3])), std::max(std::max(x[4], x[5]), std::max(x[6], x[7])));
}

// DefensiveKV's plane for one head: out[i] = max over the queries of (row pooled over cells i - half .. i + half of the
// prefix) x c, where c rescales the pooled row to the row's prefix mass. L: the head's e^logit [cell][query], q_sum:
// the rows' normalisers, n_a of the A queries real
void pooled_max(const float * L, const float * q_sum, int64_t A, int64_t n_a, int64_t n, int64_t n_prefix, int32_t kernel,
        float * out) {
    const int64_t half = kernel / 2, V = A / 8;
    // per query the prefix mass P and the pooled row's mass W (cell j lies in as many windows as reach it): pooled
    // sums x P / (W x normaliser) are the normalised pooled row rescaled to the normalised prefix mass
    std::vector<float> mass(3 * A, 0.0f); // P, W, then the rescale c per query
    f32x8 * P = (f32x8 *) mass.data();
    f32x8 * W = (f32x8 *) (mass.data() + A);
    float * c_buf = mass.data() + 2 * A;
    for (int64_t j = 0; j < n_prefix; ++j) {
        const float reach = (float) (std::min(j + half, n_prefix - 1) - std::max<int64_t>(j - half, 0) + 1);
        const f32x8 * l = (const f32x8 *) (L + j * A);
        for (int64_t v = 0; v < V; ++v) {
            P[v] += l[v];
            W[v] += l[v] * reach;
        }
    }
    for (int64_t a = 0; a < A; ++a) {
        const float p = mass[a], w = mass[A + a];
        c_buf[a] = a < n_a && w > 0.0f && q_sum[a] > 0.0f ? p / (w * q_sum[a]) : 0.0f; // padded queries count nowhere
    }
    const f32x8 * c = (const f32x8 *) c_buf;
    for (int64_t i = 0; i < n_prefix; ++i) {
        const int64_t lo = std::max<int64_t>(0, i - half), hi = std::min(n_prefix - 1, i + half);
        f32x8 best = splat(0.0f);
        for (int64_t v = 0; v < V; ++v) {
            f32x8 sum = splat(0.0f);
            for (int64_t j = lo; j <= hi; ++j) {
                sum += ((const f32x8 *) (L + j * A))[v];
            }
            sum *= c[v];
            best = select(sum > best, sum, best);
        }
        out[i] = hmax(best);
    }
    std::fill(out + n_prefix, out + n, 0.0f);
}

// dst [n, n_head, 1 or 2] f32. src[0] the stream's K cache rows [n_kv*hd, kv_size] in the cache type; src[1] queries
// f32 [n_head*hd, n_q]; src[2] the sequence's cells i32 [n]; src[3] causal mask f32 [n, n_q]; src[4] query weights f32
// [n_q]; src[5] optional per-head mask f32 [n, n_head]. userdata: window_attn_args.
void window_attn_cpu(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const ggml_tensor * k      = dst->src[0];
    const ggml_tensor * q      = dst->src[1];
    const int32_t     * cells  = (const int32_t *) dst->src[2]->data;
    const ggml_tensor * mask   = dst->src[3];
    const float       * weight = (const float *) dst->src[4]->data;
    const ggml_tensor * head_mask = dst->src[5];
    const window_attn_args & args = *(const window_attn_args *) userdata;
    const float scale  = args.kq_scale;
    const int64_t n      = dst->ne[0];
    const int64_t n_head = dst->ne[1];
    const int64_t n_q    = q->ne[1];
    const int64_t hd     = q->ne[0] / n_head;
    const int64_t group  = n_head / (k->ne[0] / hd);

    std::vector<int64_t> active;
    for (int64_t j = 0; j < n_q; ++j) {
        if (weight[j] != 0.0f) {
            active.push_back(j);
        }
    }
    const int64_t n_a = active.size();
    const int64_t A   = (n_a + 7) / 8 * 8; // queries padded to whole vectors (weight 0)

    // the causal mask transposed to [cell][query], as the logits are laid out
    std::vector<float> causal(n * A, 0.0f);
    for (int64_t a = 0; a < n_a; ++a) {
        const float * src = (const float *) ((const char *) mask->data + active[a] * mask->nb[1]);
        for (int64_t i = 0; i < n; ++i) {
            causal[i * A + a] = src[i];
        }
    }

    // a contiguous range of query heads per thread, taken one KV head's share at a time so that each K row is
    // dequantised once for all of them
    const int64_t per = (n_head + nth - 1) / nth;
    const int64_t h_end = std::min(n_head, (ith + 1) * per);
    std::vector<float> qt, rows(CELLS * hd), logits;
    std::vector<float> q_max(A), q_sum(A), q_w(A); // per query: largest logit, normaliser, weight / normaliser
    for (int64_t h0 = ith * per; h0 < h_end; ) {
        const int64_t g  = h0 / group;
        const int64_t nh = std::min(h_end, (g + 1) * group) - h0;
        const size_t k_off = ggml_row_size(k->type, g * hd); // the KV head's slice of a K row
        const size_t slice_bytes = ggml_row_size(k->type, hd);
        qt.assign(nh * hd * A, 0.0f);                        // [head][dim][query], scaled
        logits.resize(nh * n * A);                           // [head][cell][query]
        for (int64_t hh = 0; hh < nh; ++hh) {
            for (int64_t a = 0; a < n_a; ++a) {
                const float * src = (const float *) ((const char *) q->data + active[a] * q->nb[1]) + (h0 + hh) * hd;
                for (int64_t d = 0; d < hd; ++d) {
                    qt[(hh * hd + d) * A + a] = src[d] * scale;
                }
            }
        }

        for (int64_t i0 = 0; i0 < n; i0 += CELLS) {
            const int64_t nc = std::min(CELLS, n - i0);
            // the K rows are read once each, a cell apart: fetch those PREFETCH cells ahead while these compute
            for (int64_t c = 0; c < CELLS && i0 + PREFETCH + c < n; ++c) {
                const char * ahead = (const char *) k->data + cells[i0 + PREFETCH + c] * k->nb[1] + k_off;
                for (size_t b = 0; b < slice_bytes; b += 64) {
                    __builtin_prefetch(ahead + b);
                }
            }
            for (int64_t c = 0; c < CELLS; ++c) {
                if (c < nc) {
                    row_to_f32(k->type, (const char *) k->data + cells[i0 + c] * k->nb[1] + k_off, rows.data() + c * hd, hd);
                } else {
                    std::fill_n(rows.data() + c * hd, hd, 0.0f); // cells past the end: computed, never stored
                }
            }
            for (int64_t hh = 0; hh < nh; ++hh) {
                const float * hm = head_mask ? (const float *) ((const char *) head_mask->data + (h0 + hh) * head_mask->nb[1]) : nullptr;
                const float * qh = qt.data() + hh * hd * A;
                float * lh = logits.data() + hh * n * A;
                int64_t a0 = 0;
                for (; a0 + 32 <= A; a0 += 32) {
                    logits_block<4>(qh, rows.data(), causal.data(), hm, lh, A, a0, hd, i0, nc);
                }
                for (; a0 < A; a0 += 8) { // the few queries of TOVA or H2O
                    logits_block<1>(qh, rows.data(), causal.data(), hm, lh, A, a0, hd, i0, nc);
                }
            }
        }

        // softmax over the cells for every query at once, 8 queries per vector, then each cell's sum over the
        // queries with weight / normaliser
        const int64_t V = A / 8;
        f32x8 * m = (f32x8 *) q_max.data();
        f32x8 * s = (f32x8 *) q_sum.data();
        f32x8 * w = (f32x8 *) q_w.data();
        for (int64_t hh = 0; hh < nh; ++hh) {
            float * L = logits.data() + hh * n * A;
            for (int64_t v = 0; v < V; ++v) {
                m[v] = splat(-INFINITY);
                s[v] = splat(0.0f);
            }
            for (int64_t i = 0; i < n; ++i) {
                const f32x8 * l = (const f32x8 *) (L + i * A);
                for (int64_t v = 0; v < V; ++v) {
                    m[v] = select(l[v] > m[v], l[v], m[v]);
                }
            }
            for (int64_t v = 0; v < V; ++v) {
                m[v] = select(m[v] == splat(-INFINITY), splat(0.0f), m[v]); // a query that sees no cell: every e^x is 0
            }
            for (int64_t i = 0; i < n; ++i) {
                f32x8 * l = (f32x8 *) (L + i * A);
                for (int64_t v = 0; v < V; ++v) {
                    l[v] = exp_neg(l[v] - m[v]);
                    s[v] += l[v];
                }
            }
            for (int64_t a = 0; a < A; ++a) {
                q_w[a] = a < n_a && q_sum[a] > 0.0f ? weight[active[a]] / q_sum[a] : 0.0f;
            }
            float * out = (float *) dst->data + (h0 + hh) * n;
            for (int64_t i = 0; i < n; ++i) {
                const f32x8 * l = (const f32x8 *) (L + i * A);
                f32x8 t = splat(0.0f);
                for (int64_t v = 0; v < V; ++v) {
                    t += l[v] * w[v];
                }
                out[i] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
            }
            if (args.pooled_max) {
                pooled_max(L, q_sum.data(), A, n_a, n, args.n_prefix, args.pool_kernel, (float *) dst->data + (n_head + h0 + hh) * n);
            }
        }
        h0 += nh;
    }
}

} // namespace
#endif

bool window_attn_cpu_supports(const ggml_tensor * k_cache, const ggml_tensor * ring, int64_t head_dim) {
#if !defined(__GNUC__)
    (void) k_cache;
    (void) ring;
    (void) head_dim;
    return false;
#else
    // the cache and the ring are never repacked: host memory is enough to read their rows
    auto host = [](const ggml_tensor * t) { return t->buffer && ggml_backend_buffer_is_host(t->buffer); };
    return host(k_cache) && host(ring) && ring->type == GGML_TYPE_F32 &&
           (k_cache->type == GGML_TYPE_F32 || ggml_get_type_traits(k_cache->type)->to_float) &&
           head_dim % ggml_blck_size(k_cache->type) == 0;
#endif
}

ggml_tensor * window_attn_cpu_op(ggml_context * ctx, ggml_tensor * k, ggml_tensor * q, ggml_tensor * cell_idx,
        ggml_tensor * kq_mask, ggml_tensor * weight, ggml_tensor * head_mask, int64_t n_head, window_attn_args * args) {
#if defined(__GNUC__)
    ggml_tensor * src[6] = {k, q, cell_idx, kq_mask, weight, head_mask};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, cell_idx->ne[0], n_head, args->pooled_max ? 2 : 1, 1, src, head_mask ? 6 : 5,
                          window_attn_cpu, GGML_N_TASKS_MAX, args);
#else
    GGML_ABORT("the fused window attention needs GCC or Clang (window_attn_cpu_supports says so)");
#endif
}

} // namespace kv_evict
