"""The fused projected-value-norm kernel (native/cpu/) against the plain ggml graph and the numpy reference, over
weight types, cache types, head dims, GQA groups and odd cell counts; and the dispatch as kv_stats reports it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import random_tokens
from pyllmkv import _lib
from pyllmkv._lib import EvictConfig
from pyllmkv.session import Session
from scoring_reference import value_norms
from tinymodel import TinyRef, write_tiny_llama

TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}  # GGML_TYPE_*


def _norms(llama_cpp, path, cache, n_tokens, kernel, flash_attn=True, n_gpu_layers=0):
    """Value norms of every layer as llama_kv_evict_scores reports them, computed by `kernel` (the dispatch's own
    choice unless "ggml-graph"); and kv_stats."""
    if kernel == "ggml-graph":
        os.environ["LLAMA_KV_EVICT_VALUE_NORMS"] = "graph"
    try:
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=256, n_ubatch=256, verbose=False, n_threads=2,
                              flash_attn=flash_attn, type_k=TYPES[cache], type_v=TYPES[cache], n_gpu_layers=n_gpu_layers)
        n_layer = int(llama_cpp.llama_model_n_layer(llm._model.model))
        n_kv = int(llama_cpp.llama_model_n_head_kv(llm._model.model))
        sess = Session(llm, EvictConfig(budget=256, window=8))
        tokens = random_tokens(n_tokens, seed=n_tokens)
        sess.decode(tokens)
        norms = np.stack([_lib.scores(llm, il, n_kv)[2] for il in range(n_layer)])
        return tokens, norms, _lib.stats(llm)
    finally:
        os.environ.pop("LLAMA_KV_EVICT_VALUE_NORMS", None)


# head_dim x GQA group (n_head / n_head_kv) x weight type; n_embd 128 throughout
SHAPES = [(32, 2, "f32"), (64, 1, "f16"), (64, 4, "f32"), (128, 8, "f16"), (256, 2, "f32")]


@pytest.mark.parametrize("head_dim, group, wtype", SHAPES)
def test_fused_norms_equal_graph_and_numpy(llama_cpp, tmp_path, head_dim, group, wtype):
    n_head_kv = 2 if group < 8 else 1
    path = write_tiny_llama(tmp_path / "m.gguf", seed=head_dim + group, n_head=n_head_kv * group, n_head_kv=n_head_kv,
                            head_dim=head_dim, dtype=wtype)
    ref = TinyRef(path, kv_cache_dtype="f32")
    tokens, fused, st = _norms(llama_cpp, path, "f32", 101, "fused-cpu")  # 93 prefix cells: odd
    assert st["value_norm_kernel"] == "fused-cpu"
    _, graph, st = _norms(llama_cpp, path, "f32", 101, "ggml-graph")
    assert st["value_norm_kernel"] == "ggml-graph"
    trace = ref.trace(tokens)
    expected = np.stack([value_norms(layer.v, ref.w_o(il), ref.n_head)[:, : len(tokens) - 8] for il, layer in enumerate(trace.layers)])
    np.testing.assert_allclose(fused, expected, rtol=1e-4 if wtype == "f32" else 1e-3)  # f32 sums of |.|
    np.testing.assert_allclose(fused, graph, rtol=1e-4)


@pytest.mark.parametrize("cache", ["f16", "bf16", "q8_0"])
def test_fused_norms_equal_graph_for_cache_types(llama_cpp, tiny64_path, cache):
    _, fused, _ = _norms(llama_cpp, tiny64_path, cache, 77, "fused-cpu")
    _, graph, _ = _norms(llama_cpp, tiny64_path, cache, 77, "ggml-graph")
    np.testing.assert_allclose(fused, graph, rtol=1e-4)


def test_fused_norms_on_the_real_model(llama_cpp, smollm2_path):
    # SmolLM2's W_O is quantized: the kernel dequantises it tile by tile with ggml's own routines
    _, fused, st = _norms(llama_cpp, smollm2_path, "f16", 200, "fused-cpu")
    assert st["value_norm_kernel"] == "fused-cpu"
    _, graph, _ = _norms(llama_cpp, smollm2_path, "f16", 200, "ggml-graph")
    np.testing.assert_allclose(fused, graph, rtol=1e-4)
