"""The fused CPU kernels (native/cpu/: projected-value norms, window attention, transposed-V compaction) against the
plain ggml graphs and the numpy reference, over weight types, cache types, head dims, GQA groups, policies and odd cell counts; and the
dispatch as kv_stats reports it."""

from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import pytest

from conftest import random_tokens
from pyllmkv import _lib, debug
from pyllmkv._lib import EvictConfig
from pyllmkv.session import Session
from pyllmkv.reference import defensive_scores, head_scores, value_norms, value_norms_int8, window_attention
from tinymodel import TinyRef, write_tiny_llama

TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q4_0": 2, "q8_0": 8}  # GGML_TYPE_*
FORCE_GRAPH = {"norms": "LLAMA_KV_EVICT_VALUE_NORMS", "attn": "LLAMA_KV_EVICT_WINDOW_ATTN"}


def _scores(llama_cpp, path, cache, n_tokens, graph=(), policy="criticalkv", budget=256, window=8, flash_attn=True,
            n_gpu_layers=0):
    """Scores and value norms of every layer as llama_kv_evict_scores reports them, computed by the dispatch's own
    choice of kernels except those named in `graph` ("norms", "attn"), forced to the ggml graphs; kv_stats; the model.
    With a budget below n_tokens, one eviction happens before the last two tokens, and the scores are the next one's."""
    for name in graph:
        os.environ[FORCE_GRAPH[name]] = "graph"
    try:
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=256, n_ubatch=256, verbose=False, n_threads=2,
                              flash_attn=flash_attn, type_k=TYPES[cache], type_v=TYPES[cache], n_gpu_layers=n_gpu_layers)
        n_layer = int(llama_cpp.llama_model_n_layer(llm._model.model))
        n_kv = int(llama_cpp.llama_model_n_head_kv(llm._model.model))
        sess = Session(llm, EvictConfig(budget=budget, window=window, policy=policy))
        tokens = random_tokens(n_tokens, seed=n_tokens)
        sess.decode(tokens[:-2])
        if budget < n_tokens:
            sess.evict()
        for t in tokens[-2:]:  # single-token decodes after the eviction: H2O has new queries to count
            sess.decode([t])
        per_layer = [_lib.scores(llm, il, n_kv) for il in range(n_layer)]
        return tokens, np.stack([s for _, s, _ in per_layer]), np.stack([n for _, _, n in per_layer]), _lib.stats(llm), llm
    finally:
        for name in graph:
            os.environ.pop(FORCE_GRAPH[name], None)


def _norms(llama_cpp, path, cache, n_tokens, kernel, **kw):
    tokens, _, norms, st, _ = _scores(llama_cpp, path, cache, n_tokens, graph=("norms",) if kernel == "ggml-graph" else (), **kw)
    return tokens, norms, st


def shaped_model(tmp_path, head_dim, group, seed, dtype="f32", n_embd=128):
    """A tiny model of this head dim and GQA group (n_head / n_head_kv); returns (path, n_head_kv)."""
    n_head_kv = 2 if group < 8 else 1
    path = write_tiny_llama(tmp_path / "m.gguf", seed=seed, n_head=n_head_kv * group, n_head_kv=n_head_kv,
                            head_dim=head_dim, dtype=dtype, n_embd=n_embd)
    return path, n_head_kv


def norms_reference(llm, ref, n_tokens, n_prefix, int8=False):
    """The numpy value norms on the kernel's own inputs: the f32 cache's V rows, and W_O as TinyRef reads the file;
    with `int8`, both rounded to 8 bits as the int8 kernel does."""
    norms = value_norms_int8 if int8 else value_norms
    return np.stack([
        norms(debug.read_rows(llm, il, True, n_tokens).view(np.float32).reshape(n_tokens, ref.n_head_kv, ref.head_dim),
              ref.w_o(il), ref.n_head)[:, :n_prefix]
        for il in range(ref.n_layer)])


def int8_norms_expected() -> bool:
    """Whether the CPU kernel computes the norms of quantised W_O in int8 here: the build compiles native/cpu/ for the
    machine's CPU (GGML_NATIVE), and the int8 product needs AVX-512 VNNI."""
    try:
        flags = next((line.split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
        return {"avx512f", "avx512bw", "avx512_vnni"} <= set(flags)
    except OSError:  # macOS: an Intel CPU's leaf-7 features (none on Apple silicon)
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.leaf7_features"], capture_output=True, text=True).stdout
        return {"AVX512F", "AVX512BW", "AVX512VNNI"} <= set(out.split())


# head_dim x GQA group (n_head / n_head_kv) x weight type; n_embd 128 throughout
SHAPES = [(32, 2, "f32"), (64, 1, "f16"), (64, 4, "f32"), (128, 8, "f16"), (256, 2, "f32")]


@pytest.mark.parametrize("head_dim, group, wtype", SHAPES)
def test_fused_norms_equal_graph_and_numpy(llama_cpp, tmp_path, head_dim, group, wtype):
    path, _ = shaped_model(tmp_path, head_dim, group, seed=head_dim + group, dtype=wtype)
    ref = TinyRef(path, kv_cache_dtype="f32")
    tokens, fused, st = _norms(llama_cpp, path, "f32", 101, "fused-cpu")  # 93 prefix cells: odd
    assert st["value_norm_kernel"] == "fused-cpu"
    _, graph, st = _norms(llama_cpp, path, "f32", 101, "ggml-graph")
    assert st["value_norm_kernel"] == "ggml-graph"
    trace = ref.trace(tokens)
    expected = np.stack([value_norms(layer.v, ref.w_o(il), ref.n_head)[:, : len(tokens) - 8] for il, layer in enumerate(trace.layers)])
    np.testing.assert_allclose(fused, expected, rtol=1e-4 if wtype == "f32" else 1e-3)  # f32 sums of |.|
    np.testing.assert_allclose(fused, graph, rtol=1e-4)


# the int8 product of quantised W_O over head dims and GQA groups, n_embd 160 (a last tile of 32 outputs), against
# numpy's rounding of the same inputs and, within 1 %, the floats; a head dim not a multiple of 16 keeps floats
@pytest.mark.parametrize("head_dim, group", [(32, 2), (64, 4), (128, 8), (256, 2), (40, 2)])
def test_fused_norms_of_quantised_w_o(llama_cpp, tmp_path, head_dim, group):
    path, _ = shaped_model(tmp_path, head_dim, group, seed=head_dim + 3 * group, dtype="q4_0", n_embd=160)
    ref = TinyRef(path)
    tokens, _, norms, st, llm = _scores(llama_cpp, path, "f32", 101)  # 93 prefix cells: odd
    int8 = int8_norms_expected() and head_dim % 16 == 0
    assert st["value_norm_kernel"] == ("fused-cpu-int8" if int8 else "fused-cpu")
    n = len(tokens)
    np.testing.assert_allclose(norms, norms_reference(llm, ref, n, n - 8, int8), rtol=1e-5)
    np.testing.assert_allclose(norms, norms_reference(llm, ref, n, n - 8), rtol=1e-2 if int8 else 1e-4)


@pytest.mark.parametrize("cache", ["f16", "bf16", "q8_0"])
def test_fused_norms_equal_graph_for_cache_types(llama_cpp, tiny64_path, cache):
    _, fused, _ = _norms(llama_cpp, tiny64_path, cache, 77, "fused-cpu")
    _, graph, _ = _norms(llama_cpp, tiny64_path, cache, 77, "ggml-graph")
    np.testing.assert_allclose(fused, graph, rtol=1e-4)


def test_fused_norms_on_the_real_model(llama_cpp, smollm2_path, monkeypatch):
    # SmolLM2's W_O is quantized: the kernel dequantises it tile by tile with ggml's own routines, and rounds it and V
    # to 8 bits where the CPU has AVX-512 VNNI (LLAMA_KV_EVICT_VALUE_NORMS=f32 keeps floats)
    _, graph, _ = _norms(llama_cpp, smollm2_path, "f16", 200, "ggml-graph")
    _, fused, st = _norms(llama_cpp, smollm2_path, "f16", 200, "fused-cpu")
    assert st["value_norm_kernel"] == ("fused-cpu-int8" if int8_norms_expected() else "fused-cpu")
    np.testing.assert_allclose(fused, graph, rtol=1e-2 if int8_norms_expected() else 1e-4)
    monkeypatch.setenv("LLAMA_KV_EVICT_VALUE_NORMS", "f32")
    _, fused, st = _norms(llama_cpp, smollm2_path, "f16", 200, "fused-cpu")
    assert st["value_norm_kernel"] == "fused-cpu"
    np.testing.assert_allclose(fused, graph, rtol=1e-4)


def window_attentions(llm, n_layer, n_head_kv, group, head_dim) -> list:
    """Per layer the numpy window attention [n_head, n_q, cells] on the kernel's own inputs: the captured queries and
    the f32 cache's K rows."""
    pos = _lib.positions(llm)
    out = []
    for il in range(n_layer):
        q_pos, q, scale = debug.queries(llm, il)
        k = debug.read_rows(llm, il, False, len(pos)).view(np.float32).reshape(len(pos), n_head_kv, head_dim)
        out.append(window_attention(q.reshape(len(q_pos), n_head_kv * group, head_dim), q_pos, k, pos, scale))
    return out


def attention_reference(llm, n_layer, n_head_kv, group, head_dim, policy):
    return np.stack([head_scores(a, a.shape[1], n_head_kv, policy)
                     for a in window_attentions(llm, n_layer, n_head_kv, group, head_dim)])


# the window attention: head_dim x GQA group x policy (the query weights: window mean, last query, not yet counted)
ATTN_SHAPES = [(32, 2, "snapkv"), (64, 1, "tova"), (64, 4, "h2o"), (128, 8, "criticalkv"), (256, 2, "snapkv")]


@pytest.mark.parametrize("head_dim, group, policy", ATTN_SHAPES)
def test_fused_window_attention_equals_graph_and_numpy(llama_cpp, tmp_path, head_dim, group, policy):
    path, n_head_kv = shaped_model(tmp_path, head_dim, group, seed=head_dim * group)
    tokens, fused, _, st, llm = _scores(llama_cpp, path, "f32", 101, policy=policy)  # 93 prefix cells: odd
    assert st["window_attn_kernel"] == "fused-cpu"
    np.testing.assert_allclose(fused, attention_reference(llm, len(fused), n_head_kv, group, head_dim, policy),
                               rtol=1e-4, atol=1e-7)
    _, graph, _, st, _ = _scores(llama_cpp, path, "f32", 101, graph=("attn",), policy=policy)
    assert st["window_attn_kernel"] == "ggml-graph"
    np.testing.assert_allclose(fused, graph, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("cache", ["f16", "bf16", "q8_0", "q4_0"])
def test_fused_window_attention_equals_graph_for_cache_types(llama_cpp, tiny64_path, cache):
    # the fused kernel dequantises K with ggml's own routine, the graph with get_rows: the same values
    _, fused, _, _, _ = _scores(llama_cpp, tiny64_path, cache, 77, policy="snapkv")
    _, graph, _, _, _ = _scores(llama_cpp, tiny64_path, cache, 77, graph=("attn",), policy="snapkv")
    np.testing.assert_allclose(fused, graph, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("policy", ["criticalkv-ada", "h2o"])
def test_fused_window_attention_after_an_eviction(llama_cpp, tiny64_path, policy):
    # after a head-wise AdaKV eviction a KV head holds no token in some cells (the per-head mask); H2O counts only the
    # queries decoded since its last eviction
    _, fused, _, st, _ = _scores(llama_cpp, tiny64_path, "f16", 160, policy=policy, budget=64)
    assert st["n_evictions"] >= 1 and st["window_attn_kernel"] == "fused-cpu"
    _, graph, _, _, _ = _scores(llama_cpp, tiny64_path, "f16", 160, graph=("attn",), policy=policy, budget=64)
    np.testing.assert_allclose(fused, graph, rtol=1e-4, atol=1e-7)


def test_fused_window_attention_on_the_real_model(llama_cpp, smollm2_path):
    _, fused, _, st, _ = _scores(llama_cpp, smollm2_path, "f16", 200, policy="snapkv")
    assert st["window_attn_kernel"] == "fused-cpu"
    _, graph, _, _, _ = _scores(llama_cpp, smollm2_path, "f16", 200, graph=("attn",), policy="snapkv")
    np.testing.assert_allclose(fused, graph, rtol=1e-4, atol=1e-7)


def defensive_reference(llm, n_layer, n_head_kv, group, head_dim, norms, budget):
    """The numpy DefensiveKV scores on the kernel's own inputs and the hook's value norms."""
    return np.stack([defensive_scores(a, a.shape[1], n_head_kv, norms[il], budget - a.shape[1])
                     for il, a in enumerate(window_attentions(llm, n_layer, n_head_kv, group, head_dim))])


# DefensiveKV's maximum over the window's queries of their pooled rows, kept inside the fused kernel and the graph
@pytest.mark.parametrize("head_dim, group, budget", [(32, 2, 128), (64, 4, 64), (128, 8, 128)])
def test_fused_pooled_maximum_equals_graph_and_numpy(llama_cpp, tmp_path, head_dim, group, budget):
    path, n_head_kv = shaped_model(tmp_path, head_dim, group, seed=head_dim + 7 * group)
    # budget 64 of 101 tokens: one eviction first, so some heads hold no token in some cells
    _, fused, norms, st, llm = _scores(llama_cpp, path, "f32", 101, policy="defensivekv", budget=budget)
    assert st["window_attn_kernel"] == "fused-cpu" and st["n_evictions"] == (budget < 101)
    if budget > 101:
        np.testing.assert_allclose(fused, defensive_reference(llm, len(fused), n_head_kv, group, head_dim, norms, budget),
                                   rtol=1e-4, atol=1e-7)
    _, graph, _, st, _ = _scores(llama_cpp, path, "f32", 101, graph=("attn",), policy="defensivekv", budget=budget)
    assert st["window_attn_kernel"] == "ggml-graph"
    np.testing.assert_allclose(fused, graph, rtol=1e-4, atol=1e-7)


def test_fused_pooled_maximum_on_the_real_model(llama_cpp, smollm2_path):
    _, fused, _, st, _ = _scores(llama_cpp, smollm2_path, "f16", 200, policy="defensivekv-layer", budget=128)
    assert st["window_attn_kernel"] == "fused-cpu"
    _, graph, _, _, _ = _scores(llama_cpp, smollm2_path, "f16", 200, graph=("attn",), policy="defensivekv-layer", budget=128)
    np.testing.assert_allclose(fused, graph, rtol=1e-4, atol=1e-7)


def test_fused_norms_on_weights_llama_cpp_would_repack(llama_cpp, tmp_path):
    # llama.cpp repacks Q4_0 weights of a CPU model for its own matmul (CPU_REPACK), in a layout the fused kernel cannot
    # read; pyllmkv loads CPU models without repacking, and the fused kernel reads W_O in the file's Q4_0
    path = write_tiny_llama(tmp_path / "q4_0.gguf", seed=5, head_dim=64, dtype="q4_0")
    ref = TinyRef(path)
    tokens, _, norms, st, llm = _scores(llama_cpp, path, "f32", 101)
    int8 = int8_norms_expected()
    assert st["value_norm_kernel"] == ("fused-cpu-int8" if int8 else "fused-cpu")
    # W_O dequantised by gguf-py; rounded to 8 bits with V by the int8 kernel, which is then within 1 % of the floats
    exact = norms_reference(llm, ref, len(tokens), len(tokens) - 8)
    np.testing.assert_allclose(norms, norms_reference(llm, ref, len(tokens), len(tokens) - 8, int8), rtol=1e-4)
    np.testing.assert_allclose(norms, exact, rtol=1e-2 if int8 else 1e-4)
    # repacked, as stock llama.cpp loads it: the fused kernel cannot read W_O and the graph runs
    with _lib.cpu_weights("repack-all"):
        _, _, graph, st, _ = _scores(llama_cpp, path, "f32", 101)
    assert st["value_norm_kernel"] == "ggml-graph"
    np.testing.assert_allclose(graph, exact, rtol=5e-3)  # the graph rounds V to q8_0 for its Q4_0 matmul


def test_repack_keeps_w_o_plain_for_the_fused_kernel(llama_cpp, tmp_path, capsys):
    # cpu_weights("repack") (--repack): llama.cpp repacks every weight of a CPU model it would (its load log names each)
    # but W_O, which the plain buffer type keeps in the file's Q4_0, where the fused kernel reads it
    path = write_tiny_llama(tmp_path / "q4_0.gguf", seed=5, head_dim=64, dtype="q4_0")
    ref = TinyRef(path)
    for layout, w_o_repacked in (("repack", False), ("repack-all", True)):
        with _lib.cpu_weights(layout):
            llama_cpp.Llama(model_path=path, n_ctx=64, verbose=True).close()
        log = capsys.readouterr().err
        assert re.search(r"repack tensor blk\.0\.attn_q\.weight", log), log
        assert bool(re.search(r"repack tensor blk\.\d+\.attn_output\.weight", log)) == w_o_repacked
    with _lib.cpu_weights("repack"):
        tokens, _, norms, st, llm = _scores(llama_cpp, path, "f32", 101)
    int8 = int8_norms_expected()
    assert st["value_norm_kernel"] == ("fused-cpu-int8" if int8 else "fused-cpu")
    np.testing.assert_allclose(norms, norms_reference(llm, ref, len(tokens), len(tokens) - 8, int8), rtol=1e-4)
    with pytest.raises(ValueError, match="unknown weight layout"):
        _lib.cpu_weights("interleaved").__enter__()


def _compacted_rows(llama_cpp, path, cache, policy, graph: bool):
    """Every layer's K and V rows of the sequence's cells after head-wise evictions with a transposed V cache (flash
    attention off), compacted by the fused kernel or (graph) the ggml graph; and the kernel kv_stats names."""
    if graph:
        os.environ["LLAMA_KV_EVICT_COMPACT"] = "graph"
    try:
        config = EvictConfig.for_cells(96, window=8, policy=policy, prompt_tail=False)
        llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=64, n_ubatch=64, verbose=False, n_threads=2,
                              flash_attn=False, type_k=TYPES[cache], type_v=TYPES[cache])
        sess = Session(llm, config)
        sess.decode(random_tokens(400, seed=7))
        n_layer = int(llama_cpp.llama_model_n_layer(llm._model.model))
        st = _lib.stats(llm)
        rows = [debug.read_rows(llm, il, is_v, st["n_seq_cells"]) for il in range(n_layer) for is_v in (False, True)]
        return rows, st
    finally:
        os.environ.pop("LLAMA_KV_EVICT_COMPACT", None)


@pytest.mark.parametrize("cache", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("policy", ["snapkv", "criticalkv-ada"])
def test_fused_compaction_equals_graph(llama_cpp, tiny64_path, cache, policy):
    """The kept rows a transposed V cache holds after head-wise evictions are the same bytes whether the fused kernel
    or the graph moved them (the -ada policy: heads of unequal shares)."""
    fused, st = _compacted_rows(llama_cpp, tiny64_path, cache, policy, graph=False)
    graph, st_graph = _compacted_rows(llama_cpp, tiny64_path, cache, policy, graph=True)
    assert st["n_evictions"] >= 3 and (st["compact_kernel"], st_graph["compact_kernel"]) == ("fused-cpu", "ggml-graph")
    for a, b in zip(fused, graph):
        np.testing.assert_array_equal(a, b)
