"""On a machine with an NVIDIA GPU and a CUDA build (scripts/gpu-check): the CUDA kernels compute the same value norms
and window attention as the fused CPU kernels, and the dispatch reports them. Deselected unless pytest runs with
`-m gpu`."""

from __future__ import annotations

import numpy as np
import pytest

from test_kernels import _scores

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model", ["tiny64_path", "smollm2_path"])
@pytest.mark.parametrize("cache", ["f16", "q8_0"])
def test_cuda_kernels_equal_cpu_kernels(llama_cpp, request, model, cache):
    path = request.getfixturevalue(model)
    _, cpu_scores, cpu_norms, st, _ = _scores(llama_cpp, path, cache, 150)
    assert (st["value_norm_kernel"], st["window_attn_kernel"]) == ("fused-cpu", "fused-cpu")
    _, cuda_scores, cuda_norms, st, _ = _scores(llama_cpp, path, cache, 150, n_gpu_layers=99)
    assert (st["value_norm_kernel"], st["window_attn_kernel"]) == ("fused-cuda", "fused-cuda"), \
        "the model's weights and cache should be on the GPU"
    np.testing.assert_allclose(cuda_norms, cpu_norms, rtol=1e-4)
    np.testing.assert_allclose(cuda_scores, cpu_scores, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("policy", ["criticalkv-ada", "h2o", "tova"])
def test_cuda_window_attention_after_an_eviction(llama_cpp, tiny64_path, policy):
    # AdaKV's per-head mask of cells a KV head holds no token in; the query weights of H2O and TOVA
    _, cpu, _, _, _ = _scores(llama_cpp, tiny64_path, "f16", 160, policy=policy, budget=64)
    _, cuda, _, st, _ = _scores(llama_cpp, tiny64_path, "f16", 160, policy=policy, budget=64, n_gpu_layers=99)
    assert st["n_evictions"] >= 1 and st["window_attn_kernel"] == "fused-cuda"
    np.testing.assert_allclose(cuda, cpu, rtol=1e-4, atol=1e-7)
