// The CUDA kernels' entry points, callable from C++ built without CUDA headers. Both run on the legacy default stream
// after the caller synchronized the context, on f32 device arrays a ggml graph prepared on the CUDA backend, and
// return 0, or < 0 if an input is not device memory (-1), allocation (-2) or the launch (-3) failed.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// norms [n_head][m] (host) of m cells: W_O f32 [n_out][n_head*hd] and V rows f32 [m][n_kv*hd]
int pyllmkv_value_norm_cuda(const float * W, const float * V, float * out_host, int m, int n_head, int n_kv, int hd, int n_out);

// out [n_head][n] (host): per query head h, sum over the window queries j of weight[j] * softmax_i(scale * Q_jh . K_i
// + mask[j][i] + head_mask[h][i]). K rows f32 [n][n_kv*hd] and queries Q f32 [n_q][n_head*hd] on the device; mask
// [n_q][n], head_mask [n_head][n] (may be NULL) and weight [n_q] on the host
int pyllmkv_window_attn_cuda(const float * K, const float * Q, const float * mask_host, const float * head_mask_host,
        const float * weight_host, float * out_host, int n, int n_q, int n_head, int n_kv, int hd, float scale);

#ifdef __cplusplus
}
#endif
