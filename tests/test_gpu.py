"""On a machine with an NVIDIA GPU and a CUDA build (scripts/gpu-check): with the model and cache on the GPU, the CUDA
value-norm kernel and the window attention (the ggml graph on CUDA) against the numpy reference on their own inputs,
read back from the GPU cache. Deselected unless pytest runs with `-m gpu`.

The CPU kernels are not the oracle: the forward pass on the GPU rounds K, V and the queries otherwise than on the CPU,
and an f16 cache turns that into differences of f16 ulps (5e-4) that the softmax carries on."""

from __future__ import annotations

import numpy as np
import pytest

from pyllmkv import debug
from test_head_granularity import _context, renumbering_against_numpy
from test_hook import _llama
from test_kernels import ATTN_SHAPES, SHAPES, _scores, attention_reference, norms_reference, shaped_model
from test_prompt_tail import tail_scores_against_numpy
from test_state import loaded_state_against_the_original
from tinymodel import TinyRef

pytestmark = pytest.mark.gpu
GPU = {"n_gpu_layers": 99}


@pytest.mark.parametrize("head_dim, group, wtype", SHAPES)
def test_cuda_value_norms_equal_numpy(llama_cpp, tmp_path, head_dim, group, wtype):
    path, _ = shaped_model(tmp_path, head_dim, group, seed=head_dim + group, dtype=wtype)
    tokens, _, norms, st, llm = _scores(llama_cpp, path, "f32", 101, **GPU)  # 93 prefix cells: odd
    assert st["value_norm_kernel"] == "fused-cuda", "the model's weights and cache should be on the GPU"
    np.testing.assert_allclose(norms, norms_reference(llm, TinyRef(path), len(tokens), len(tokens) - 8),
                               rtol=1e-4 if wtype == "f32" else 1e-3)


@pytest.mark.parametrize("head_dim, group, policy", ATTN_SHAPES)
def test_cuda_window_attention_equals_numpy(llama_cpp, tmp_path, head_dim, group, policy):
    path, n_head_kv = shaped_model(tmp_path, head_dim, group, seed=head_dim + group)
    _, scores, _, st, llm = _scores(llama_cpp, path, "f32", 101, policy=policy, **GPU)
    assert st["window_attn_kernel"] == "ggml-graph"
    # ggml-cuda multiplies f32 matrices in TF32 (cuBLAS's tensor-op math mode): logits to ~1e-3
    np.testing.assert_allclose(scores, attention_reference(llm, len(scores), n_head_kv, group, head_dim, policy),
                               rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("policy", ["criticalkv-ada", "snapkv"])
def test_cuda_eviction_keeps_the_cells_the_cpu_keeps(llama_cpp, tiny64_path, policy):
    # the whole eviction on the GPU (scores, AdaKV's per-head masks, compaction) against the same on the CPU: the cells
    # each KV head keeps, as positions; rounding may swap cells whose scores tie to ~1e-3, so a few may differ
    held = {}
    for ngl in (0, 99):
        _, _, _, st, llm = _scores(llama_cpp, tiny64_path, "f32", 160, policy=policy, budget=64, n_gpu_layers=ngl)
        assert st["n_evictions"] >= 1
        n_kv = int(llama_cpp.llama_model_n_head_kv(llm._model.model))
        held[ngl] = [{(h, int(p)) for h, row in enumerate(debug.head_positions(llm, il, n_kv)) for p in row if p >= 0}
                     for il in range(int(llama_cpp.llama_model_n_layer(llm._model.model)))]
    for cpu, gpu in zip(held[0], held[99]):
        assert len(cpu) == len(gpu)
        assert len(cpu & gpu) >= 0.95 * len(cpu)


@pytest.mark.parametrize("cache", ["f32", "q8_0"])
def test_cuda_renumbering_equals_numpy(llama_cpp, tiny64_path, cache):
    # renumbering's graphs on the GPU cache: each head's rows (one view of the layer, quantized or not) and the captured
    # queries; logits to the GPU forward pass's rounding (TF32)
    llm = _context(llama_cpp, tiny64_path, cache, flash_attn=cache != "f32", **GPU)
    renumbering_against_numpy(llm, tiny64_path, "criticalkv", cache, atol=0.25, rope_atol=1e-4)


def test_cuda_prompt_tail_queries_and_their_scores_equal_numpy(llama_cpp, tiny64_path):
    # the query ring on the GPU read out (the tail's context) and written in (the evicting context), then scored there;
    # the projections round as TF32
    llm = _llama(llama_cpp, tiny64_path, n_batch=32, **GPU)
    tail_scores_against_numpy(llm, tiny64_path, "criticalkv", q_atol=2e-2, score_tol=dict(rtol=1e-2, atol=1e-5))


@pytest.mark.parametrize("policy", ["criticalkv", "criticalkv-ada"])
def test_cuda_loaded_state_evicts_as_the_original(tiny64_path, policy):
    # a cache's state with its hook data (the -ada per-head mask included), saved from and loaded into GPU caches
    loaded_state_against_the_original(tiny64_path, policy, atol=1e-3, **GPU)
