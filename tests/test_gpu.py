"""On a machine with an NVIDIA GPU and a CUDA build (scripts/gpu-check): the CUDA kernel computes the same norms as
the fused CPU kernel, and the dispatch reports it. Deselected unless pytest runs with `-m gpu`."""

from __future__ import annotations

import numpy as np
import pytest

from test_kernels import _norms

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model", ["tiny64_path", "smollm2_path"])
@pytest.mark.parametrize("cache", ["f16", "q8_0"])
def test_cuda_norms_equal_cpu_norms(llama_cpp, request, model, cache):
    path = request.getfixturevalue(model)
    _, cpu, st = _norms(llama_cpp, path, cache, 150, "fused-cpu")
    assert st["value_norm_kernel"] == "fused-cpu"
    _, cuda, st = _norms(llama_cpp, path, cache, 150, "fused-cuda", n_gpu_layers=99)
    assert st["value_norm_kernel"] == "fused-cuda", "the model's weights and cache should be on the GPU"
    np.testing.assert_allclose(cuda, cpu, rtol=1e-4)
