// Fused projected-value norms for CUDA: n^h_i = |V_i W_O^h|_1 without materialising V W_O.
//
// One block per (32 cells, query head h): the cells' V rows of h's KV head stay in shared memory, W_O^h is streamed
// OUTS output rows at a time through shared memory, each thread forms one (cell, output) dot product and keeps
// only its |.|; a reduction over the block's output lanes gives the cells' norms. The V rows lie hd + 1 floats apart,
// so that a warp's 32 lanes (32 cells at one dim) read 32 shared-memory banks, not all the same one. Inputs are f32
// device arrays that the hook's ggml graph prepared on the CUDA backend (V gathered from the cache, W_O dequantised by
// get_rows).
#include "kernels-cuda.h"

#include <cuda_runtime.h>

namespace {

constexpr int CELLS = 32; // cells per block: one warp lane each
constexpr int OUTS  = 8;  // output rows of W_O per step: one warp each

// W [n_out][k_in] (row j = output j, k_in = n_head*hd), V [m][n_kv*hd], out [n_head][m]
__global__ void value_norm(const float * __restrict__ W, const float * __restrict__ V, float * __restrict__ out,
        int m, int n_head, int n_kv, int hd, int n_out) {
    extern __shared__ float smem[];
    const int v_stride = hd + 1;
    float * v_tile = smem;                      // [CELLS][v_stride]
    float * w_tile = smem + CELLS * v_stride;   // [OUTS][hd]
    float * part   = w_tile + OUTS * hd;        // [OUTS][CELLS]

    const int lane = threadIdx.x;               // cell within the block
    const int row  = threadIdx.y;               // output within a step
    const int h    = blockIdx.y;
    const int g    = h / (n_head / n_kv);
    const int c0   = blockIdx.x * CELLS;
    const int k_in = n_head * hd;

    for (int idx = row * CELLS + lane; idx < CELLS * hd; idx += CELLS * OUTS) {
        const int c = idx / hd, d = idx % hd;
        v_tile[c * v_stride + d] = c0 + c < m ? V[(size_t) (c0 + c) * n_kv * hd + g * hd + d] : 0.0f;
    }

    float acc = 0.0f;
    for (int j0 = 0; j0 < n_out; j0 += OUTS) {
        __syncthreads();
        for (int idx = row * CELLS + lane; idx < OUTS * hd; idx += CELLS * OUTS) {
            const int j = idx / hd, d = idx % hd;
            w_tile[idx] = j0 + j < n_out ? W[(size_t) (j0 + j) * k_in + h * hd + d] : 0.0f;
        }
        __syncthreads();
        float y = 0.0f;
        for (int d = 0; d < hd; ++d) {
            y += w_tile[row * hd + d] * v_tile[lane * v_stride + d];
        }
        acc += fabsf(y);
    }

    part[row * CELLS + lane] = acc;
    __syncthreads();
    if (row == 0 && c0 + lane < m) {
        float s = 0.0f;
        for (int r = 0; r < OUTS; ++r) {
            s += part[r * CELLS + lane];
        }
        out[(size_t) h * m + c0 + lane] = s;
    }
}

} // namespace

extern "C" int pyllmkv_value_norm_cuda(const float * W, const float * V, float * out_host, int m, int n_head, int n_kv,
        int hd, int n_out) {
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, W) != cudaSuccess || attr.type != cudaMemoryTypeDevice) {
        return -1;
    }
    cudaSetDevice(attr.device);
    float * out = nullptr;
    if (cudaMalloc(&out, sizeof(float) * (size_t) m * n_head) != cudaSuccess) {
        return -2;
    }
    const dim3   block(CELLS, OUTS);
    const dim3   grid((m + CELLS - 1) / CELLS, n_head);
    const size_t shared = sizeof(float) * ((size_t) CELLS * (hd + 1) + OUTS * hd + OUTS * CELLS);
    value_norm<<<grid, block, shared>>>(W, V, out, m, n_head, n_kv, hd, n_out);
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) {
        err = cudaMemcpy(out_host, out, sizeof(float) * (size_t) m * n_head, cudaMemcpyDeviceToHost);
    }
    cudaFree(out);
    return err == cudaSuccess ? 0 : -3;
}
