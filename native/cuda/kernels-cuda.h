// The CUDA kernel's entry point, callable from C++ built without CUDA headers. It runs on the legacy default stream
// after the caller synchronized the context, on f32 device arrays a ggml graph prepared on the CUDA backend, and
// returns 0, or < 0 if an input is not device memory (-1), allocation (-2) or the launch (-3) failed.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// norms [n_head][m] (host) of m cells: W_O f32 [n_out][n_head*hd] and V rows f32 [m][n_kv*hd]
int pyllmkv_value_norm_cuda(const float * W, const float * V, float * out_host, int m, int n_head, int n_kv, int hd, int n_out);

#ifdef __cplusplus
}
#endif
