// Fused window attention for CUDA: per query head, the window queries' softmax attention over the cells, summed with
// the queries' weights, without materialising [cells, queries, heads].
//
// One block per (query head h, window query j of nonzero weight). The query stays in shared memory; the block's
// threads stride over the cells twice: first for the softmax's max and normaliser (each thread keeps an online pair,
// merged by warp shuffles and then across warps), then recomputing each logit and adding weight * probability to the
// cell's output with atomicAdd (the blocks of h's queries meet there). Memory is the inputs and the output.
#include "kernels-cuda.h"

#include <cuda_runtime.h>

#include <vector>

namespace {

constexpr int THREADS = 256;
constexpr int WARPS   = THREADS / 32;

// (max, sum of exp(l - max)) of two parts as one
__device__ void merge(float & m, float & s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) {
        return; // both parts empty
    }
    s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
    m = mx;
}

__device__ float logit(const float * __restrict__ q, const float * __restrict__ k, int hd, float scale, float mask) {
    float dot = 0.0f;
    for (int d = 0; d < hd; ++d) {
        dot += q[d] * k[d];
    }
    return dot * scale + mask;
}

// K [n][n_kv*hd], Q [n_q][n_head*hd], mask [n_q][n], head_mask [n_head][n] or NULL, query [n_active] (the window
// queries of nonzero weight), weight [n_q], out [n_head][n] zeroed
__global__ void window_attn(const float * __restrict__ K, const float * __restrict__ Q, const float * __restrict__ mask,
        const float * __restrict__ head_mask, const int * __restrict__ query, const float * __restrict__ weight,
        float * __restrict__ out, int n, int n_head, int n_kv, int hd, float scale) {
    extern __shared__ float q[]; // [hd]
    __shared__ float warp_m[WARPS], warp_s[WARPS];

    const int h = blockIdx.x;
    const int j = query[blockIdx.y];
    const int g = h / (n_head / n_kv);
    for (int d = threadIdx.x; d < hd; d += THREADS) {
        q[d] = Q[(size_t) j * n_head * hd + h * hd + d];
    }
    __syncthreads();

    const float * mask_j = mask + (size_t) j * n;
    const float * mask_h = head_mask ? head_mask + (size_t) h * n : nullptr;
    auto cell_logit = [&](int i) {
        return logit(q, K + (size_t) i * n_kv * hd + g * hd, hd, scale, mask_j[i] + (mask_h ? mask_h[i] : 0.0f));
    };

    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x; i < n; i += THREADS) {
        merge(m, s, cell_logit(i), 1.0f);
    }
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffff, m, off);
        const float s2 = __shfl_xor_sync(0xffffffff, s, off);
        merge(m, s, m2, s2);
    }
    if (threadIdx.x % 32 == 0) {
        warp_m[threadIdx.x / 32] = m;
        warp_s[threadIdx.x / 32] = s;
    }
    __syncthreads();
    m = -INFINITY;
    s = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
        merge(m, s, warp_m[w], warp_s[w]);
    }
    if (m == -INFINITY) {
        return; // every cell masked for this query: it attends to nothing
    }

    const float w = weight[j] / s;
    for (int i = threadIdx.x; i < n; i += THREADS) {
        atomicAdd(out + (size_t) h * n + i, __expf(cell_logit(i) - m) * w);
    }
}

} // namespace

extern "C" int pyllmkv_window_attn_cuda(const float * K, const float * Q, const float * mask_host,
        const float * head_mask_host, const float * weight_host, float * out_host, int n, int n_q, int n_head, int n_kv,
        int hd, float scale) {
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, K) != cudaSuccess || attr.type != cudaMemoryTypeDevice) {
        return -1;
    }
    cudaSetDevice(attr.device);

    std::vector<int> query;
    for (int j = 0; j < n_q; ++j) {
        if (weight_host[j] != 0.0f) {
            query.push_back(j);
        }
    }
    const size_t n_mask = (size_t) n_q * n, n_head_mask = head_mask_host ? (size_t) n_head * n : 0, n_out = (size_t) n_head * n;
    char * buf = nullptr;
    const size_t bytes = sizeof(float) * (n_mask + n_head_mask + n_q + n_out) + sizeof(int) * query.size();
    if (cudaMalloc(&buf, bytes) != cudaSuccess) {
        return -2;
    }
    float * mask      = (float *) buf;
    float * head_mask = head_mask_host ? mask + n_mask : nullptr;
    float * weight    = mask + n_mask + n_head_mask;
    float * out       = weight + n_q;
    int   * query_dev = (int *) (out + n_out);

    cudaError_t err = cudaMemcpy(mask, mask_host, sizeof(float) * n_mask, cudaMemcpyHostToDevice);
    if (err == cudaSuccess && head_mask) {
        err = cudaMemcpy(head_mask, head_mask_host, sizeof(float) * n_head_mask, cudaMemcpyHostToDevice);
    }
    if (err == cudaSuccess) {
        err = cudaMemcpy(weight, weight_host, sizeof(float) * n_q, cudaMemcpyHostToDevice);
    }
    if (err == cudaSuccess) {
        err = cudaMemcpy(query_dev, query.data(), sizeof(int) * query.size(), cudaMemcpyHostToDevice);
    }
    if (err == cudaSuccess) {
        err = cudaMemset(out, 0, sizeof(float) * n_out);
    }
    if (err == cudaSuccess && !query.empty()) {
        window_attn<<<dim3(n_head, query.size()), THREADS, sizeof(float) * hd>>>(K, Q, mask, head_mask, query_dev, weight,
                                                                               out, n, n_head, n_kv, hd, scale);
        err = cudaGetLastError();
    }
    if (err == cudaSuccess) {
        err = cudaMemcpy(out_host, out, sizeof(float) * n_out, cudaMemcpyDeviceToHost);
    }
    cudaFree(buf);
    return err == cudaSuccess ? 0 : -3;
}
