"""Prove tests/tinymodel.py's numpy reference against llama.cpp (pyllmkv's build, hook disabled).

With the hook off the patched library runs llama.cpp's own code paths; test_hook.py proves the hook enabled within
budget gives bit-identical logits, so this oracle carries over to the hooked runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinymodel import BOS_ID, FIRST_BYTE_ID, SPACE_ID, TinyRef, write_tiny_llama  # noqa: E402


# Measured on the stock CPU build (logits are O(1..10)): f32 cache ~3e-6,
# f16 cache ~2e-3 (non-flash) / ~1e-4 (flash, vs the f16-rounding reference).
TOL_F32_CACHE = 5e-5
TOL_F16_CACHE = 1e-2


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)


def _tokens(n, seed=1, n_vocab=256):
    return [int(x) for x in np.random.default_rng(seed).integers(0, n_vocab, n)]


def _llama(llama_cpp, path, f32_cache, n_threads=1, flash_attn=False, n_ctx=256):
    kw = dict(type_k=0, type_v=0) if f32_cache else {}  # 0 = GGML_TYPE_F32
    return llama_cpp.Llama(
        model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
        verbose=False, flash_attn=flash_attn, n_threads=n_threads, n_threads_batch=n_threads,
        **kw,
    )


def _eval_logits(llm, tokens):
    start = llm.n_tokens
    llm.eval(tokens)
    return np.array(llm.scores[start : start + len(tokens)], dtype=np.float64)


# ---------------------------------------------------------------------------
# reference-only checks
# ---------------------------------------------------------------------------


def test_writer_is_deterministic(tmp_path):
    a = Path(write_tiny_llama(tmp_path / "a.gguf", seed=3)).read_bytes()
    b = Path(write_tiny_llama(tmp_path / "b.gguf", seed=3)).read_bytes()
    c = Path(write_tiny_llama(tmp_path / "c.gguf", seed=4)).read_bytes()
    assert a == b
    assert a != c


def test_reference_internal_consistency(model_path):
    ref = TinyRef(model_path)
    toks = _tokens(40)
    tr = ref.trace(toks)
    assert tr.logits.shape == (40, ref.n_vocab)
    L = tr.layers[0]
    assert L.q.shape == (40, ref.n_head, ref.head_dim)
    assert L.k.shape == L.v.shape == (40, ref.n_head_kv, ref.head_dim)
    np.testing.assert_allclose(L.attn_heads.reshape(40, -1) @ ref.w_o(0), L.attn_out)

    # keeping every cell == plain forward
    np.testing.assert_allclose(ref.decode_with_cache(toks[:25], None, toks[25:]), tr.logits[25:], atol=1e-12)
    np.testing.assert_allclose(ref.next_logits_with_mask(toks), tr.logits[-1], atol=1e-12)

    # a global mask == the same mask given per layer and KV head
    keep = np.ones(25, bool)
    keep[3:11] = False
    a = ref.decode_with_cache(toks[:25], keep, toks[25:])
    b = ref.decode_with_cache(toks[:25], np.broadcast_to(keep, (ref.n_layer, ref.n_head_kv, 25)), toks[25:])
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - tr.logits[25:]).max() > 1e-2  # eviction matters

    # head-wise eviction: only the evicted head's output changes in that layer
    kh = np.ones((ref.n_layer, ref.n_head_kv, 25), bool)
    kh[0, 1, 3:11] = False
    _, _, new = ref.decode_with_cache(toks[:25], kh, toks[25:], return_trace=True)
    _, _, full = ref.decode_with_cache(toks[:25], None, toks[25:], return_trace=True)
    g = ref.n_head // ref.n_head_kv
    d = np.abs(new.layers[0].attn_heads - full.layers[0].attn_heads).max(axis=(0, 2))
    assert np.all(d[:g] == 0) and np.all(d[g:] > 0)

    # attention is neither uniform nor one-hot
    s = np.einsum("qhd,khd->hqk", L.q, np.repeat(L.k, g, axis=1)) / np.sqrt(ref.head_dim)
    s = np.where(np.tril(np.ones((40, 40), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert 0.15 < p[:, 10:].max(-1).mean() < 0.8


# ---------------------------------------------------------------------------
# against stock llama.cpp
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_threads", [1, 2])
def test_numpy_forward_matches_stock_llama_cpp_f32_cache(llama_cpp, model_path, n_threads):
    toks = _tokens(100)
    llm = _llama(llama_cpp, model_path, f32_cache=True, n_threads=n_threads)
    got = _eval_logits(llm, toks)
    ref = TinyRef(model_path).forward(toks)
    assert np.abs(got - ref).max() < TOL_F32_CACHE


@pytest.mark.parametrize("flash_attn", [False, True])
def test_numpy_forward_matches_stock_llama_cpp_f16_cache(llama_cpp, model_path, flash_attn):
    toks = _tokens(100)
    llm = _llama(llama_cpp, model_path, f32_cache=False, n_threads=2, flash_attn=flash_attn)
    got = _eval_logits(llm, toks)
    ref = TinyRef(model_path, kv_cache_dtype="f16").forward(toks)
    assert np.abs(got - ref).max() < TOL_F16_CACHE
    # and it is really the cache precision that limits agreement
    assert np.abs(got - ref).max() > TOL_F32_CACHE


def test_flash_attn_casts_f32_cache_to_f16(llama_cpp, model_path):
    """With flash attention llama.cpp casts an f32 K/V cache to f16 (build_attn_mha),
    so an f32 cache only buys precision with flash_attn off."""
    toks = _tokens(100)
    got = _eval_logits(_llama(llama_cpp, model_path, f32_cache=True, n_threads=2, flash_attn=True), toks)
    assert np.abs(got - TinyRef(model_path, kv_cache_dtype="f16").forward(toks)).max() < TOL_F16_CACHE
    assert np.abs(got - TinyRef(model_path).forward(toks)).max() > TOL_F32_CACHE


def test_incremental_decode_matches_batch(llama_cpp, model_path):
    toks = _tokens(30, seed=5)
    llm = _llama(llama_cpp, model_path, f32_cache=True)
    got = np.concatenate([_eval_logits(llm, toks[:10])] + [_eval_logits(llm, [t]) for t in toks[10:]])
    assert np.abs(got - TinyRef(model_path).forward(toks)).max() < TOL_F32_CACHE


@pytest.mark.parametrize(
    "evict, one_by_one",
    [
        ([(5, 20), (30, 33)], False),
        ([(0, 1), (5, 20), (30, 33)], True),
        # Evicting the newest cells: llama.cpp then demands the next position be
        # pos_max + 1 (llama_decode fails with -1 otherwise), so resume there.
        ([(10, 12), (44, 48)], False),
    ],
)
def test_eviction_matches_stock_llama_cpp_seq_rm(llama_cpp, model_path, evict, one_by_one):
    """Removing cache cells with llama_memory_seq_rm == TinyRef.decode_with_cache."""
    toks = _tokens(56, seed=7)
    prefix, new = toks[:48], toks[48:]
    keep = np.ones(len(prefix), bool)
    for p0, p1 in evict:
        keep[p0:p1] = False
    resume = int(np.flatnonzero(keep).max()) + 1  # == len(prefix) unless the tail went

    llm = _llama(llama_cpp, model_path, f32_cache=True)
    _eval_logits(llm, prefix)
    mem = llama_cpp.llama_get_memory(llm.ctx)
    for p0, p1 in evict:
        assert llama_cpp.llama_memory_seq_rm(mem, 0, p0, p1)
    llm.n_tokens = resume  # Llama.eval places the next batch at n_tokens
    if one_by_one:
        got = np.concatenate([_eval_logits(llm, [t]) for t in new])
    else:
        got = _eval_logits(llm, new)

    ref_model = TinyRef(model_path)
    new_pos = resume + np.arange(len(new))
    ref = ref_model.decode_with_cache(prefix, keep, new, new_positions=new_pos)
    assert np.abs(got - ref).max() < TOL_F32_CACHE
    full = ref_model.forward(toks)[48:]
    assert np.abs(got - full).max() > 100 * TOL_F32_CACHE  # the eviction was visible

    # the single-query helper agrees for the first new token
    np.testing.assert_allclose(
        ref_model.next_logits_with_mask(prefix + new[:1], positions=list(range(48)) + [resume], keep=keep),
        ref[0], atol=1e-12,
    )


def test_other_shapes_f16_weights_tied_embeddings(llama_cpp, tmp_path):
    """head_dim != n_embd/n_head, MQA, tied lm head, f16 weights, custom eps/base."""
    path = write_tiny_llama(
        tmp_path / "odd.gguf", seed=11, n_layer=3, n_embd=96, n_head=4, n_head_kv=1, head_dim=32,
        n_ff=160, n_vocab=300, dtype="f16", tie_embeddings=True, rms_eps=1e-6, rope_freq_base=5e5,
    )
    ref = TinyRef(path)
    assert (ref.head_dim, ref.n_head_kv, ref.freq_base) == (32, 1, 5e5)
    toks = _tokens(64, seed=2, n_vocab=300)
    got = _eval_logits(_llama(llama_cpp, path, f32_cache=True), toks)
    # ggml rounds activations to f16 before f16-weight matmuls: measured ~1.3e-2
    # on logits of max ~8 (f32 weights: ~1e-5).
    assert np.abs(got - ref.forward(toks)).max() < 5e-2


def test_tokenizer_roundtrip(llama_cpp, model_path):
    llm = _llama(llama_cpp, model_path, f32_cache=True, n_ctx=64)
    text = "Hello, wörld!\n"
    ids = llm.tokenize(text.encode())
    want = [SPACE_ID if b == ord(" ") else FIRST_BYTE_ID + b for b in text.encode()]
    assert ids == [BOS_ID] + want
    assert llm.detokenize(ids[1:]).decode() == text
    assert llm.token_bos() == BOS_ID and llm.n_vocab() == 256
