"""On a machine with an NVIDIA GPU and a CUDA build (scripts/gpu-check): with the model and cache on the GPU, the CUDA
value-norm kernel and the window attention (the ggml graph on CUDA) against the numpy reference on their own inputs,
read back from the GPU cache. Deselected unless pytest runs with `-m gpu`.

The CPU kernels are not the oracle: the forward pass on the GPU rounds K, V and the queries otherwise than on the CPU,
and an f16 cache turns that into differences of f16 ulps (5e-4) that the softmax carries on."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_tokens
from pyllmkv import _lib
from pyllmkv._lib import EvictConfig
from pyllmkv.session import PromptTail, Session
from scoring_reference import head_scores, window_attention
from test_head_granularity import _context, renumbering_against_numpy
from test_kernels import ATTN_SHAPES, SHAPES, _scores, attention_reference, norms_reference, shaped_model
from test_hook import _llama
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
        held[ngl] = [{(h, int(p)) for h, row in enumerate(_lib.head_positions(llm, il, n_kv)) for p in row if p >= 0}
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
    # the query ring on the GPU read out (the tail's context) and written in (the evicting context), then scored there
    ref, window = TinyRef(tiny64_path, kv_cache_dtype="f32"), 8
    llm = _llama(llama_cpp, tiny64_path, n_batch=32, **GPU)
    sess = Session(llm, EvictConfig(budget=40, window=window))
    prefix, prompt = random_tokens(60, seed=41), random_tokens(50, seed=42)
    sess.decode(prefix)
    data = PromptTail(llm).queries(sess.ctx, sess.config, prompt, len(prefix), 32)
    _lib.set_window_queries(llm, data)
    assert _lib.window_queries(llm) == data

    end = len(prefix) + len(prompt)
    q_tail = ref.trace(prompt[-window:], positions=np.arange(end - window, end))
    pos, trace = np.arange(len(prefix)), ref.trace(prefix)
    got = np.frombuffer(data, dtype=np.float32).reshape(ref.n_layer, window, ref.n_head, ref.head_dim)
    for il in range(ref.n_layer):
        np.testing.assert_allclose(got[il], q_tail.layers[il].q, rtol=0, atol=2e-2)  # TF32 projections
        a = window_attention(got[il], pos[-window:], trace.layers[il].k, pos, 1.0 / np.sqrt(ref.head_dim))
        _, score, _ = _lib.scores(llm, il, ref.n_head_kv)
        np.testing.assert_allclose(score, head_scores(a, window, ref.n_head_kv, "criticalkv"), rtol=1e-2, atol=1e-5)


def test_cuda_ada_state_restores_the_mask_and_continues_as_the_original(tiny64_path):
    # an -ada cache's state and its per-head mask, saved from and loaded into GPU caches
    import pyllmkv
    from conftest import held_positions

    def fresh():
        return pyllmkv.Llama(tiny64_path, kv_budget=40, window=8, n_batch=32, policy="criticalkv-ada", verbose=False,
                             type_k=0, type_v=0, **GPU)

    def go_on(m):
        m.eval(random_tokens(60, seed=51))
        logits = np.ctypeslib.as_array(_lib.llama_cpp.llama_get_logits_ith(m._ctx.ctx, -1), shape=(m.n_vocab(),)).copy()
        return held_positions(m, ref), logits

    ref = TinyRef(tiny64_path)
    llm = fresh()
    llm.eval(random_tokens(200, seed=50))
    assert (held_positions(llm, ref) == -1).any()
    other = fresh()
    other.load_state(llm.save_state())
    np.testing.assert_array_equal(held_positions(other, ref), held_positions(llm, ref))
    expected, got = go_on(llm), go_on(other)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=1e-3)
