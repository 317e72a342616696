"""Session save and restore after eviction: a head-compacted sequence saved with llama.cpp's state API continues with
identical logits in a context with or without the hook; a state the hook's per-head mask would be missing from is
refused clearly, and written once the mask has been read to save beside it; loading a state into a hooked context starts the hook's bookkeeping afresh, and what pyllmkv.Llama
saves beside llama.cpp's state (where each head's row came from, the window's queries, the H2O sums) restores it: the
loaded sequence truncates and evicts as the original."""

from __future__ import annotations

import copy
import ctypes

import numpy as np
import pytest

import pyllmkv
from conftest import held_positions, random_tokens
from pyllmkv import _lib
from pyllmkv._lib import EvictConfig, KVEvictError, llama_cpp
from pyllmkv.session import Session
from test_hook import _llama
from tinymodel import TinyRef


def _save(llm) -> bytes:
    n = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
    buf = (ctypes.c_uint8 * n)()
    assert llama_cpp.llama_state_seq_get_data(llm._ctx.ctx, buf, n, 0) == n > 0
    return bytes(buf)


def _load(llm, data: bytes) -> int:
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    assert llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, len(data), 0) == len(data)
    return int(llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm._ctx.ctx), 0)) + 1


@pytest.mark.parametrize("policy, granularity", [("criticalkv", "head"), ("snapkv", "token")])
def test_state_after_eviction_continues_identically_with_and_without_the_hook(llama_cpp, tiny_path, policy, granularity):
    llm = _llama(llama_cpp, tiny_path)
    sess = Session(llm, EvictConfig(budget=40, window=8, policy=policy, granularity=granularity))
    sess.decode(random_tokens(100, seed=30))
    sess.evict()
    data = _save(llm)
    nxt = random_tokens(3, seed=31)
    expected = np.stack([sess.decode([t]) for t in nxt])

    plain = _llama(llama_cpp, tiny_path)  # stock llama.cpp: no hook
    hooked = _llama(llama_cpp, tiny_path)
    hooked_sess = Session(hooked, EvictConfig(budget=40, window=8, policy=policy, granularity=granularity))
    hooked_sess.decode(random_tokens(50, seed=32))  # something else in the cells first
    for other, other_sess in ((plain, Session(plain)), (hooked, hooked_sess)):
        other_sess.n_past = _load(other, data)
        assert other_sess.n_past == sess.n_past - 3
        # the same rows at the same positions; llama.cpp's loader packs them into other cells, which changes only
        # the order of the attention sums (f32 cache)
        np.testing.assert_allclose(np.stack([other_sess.decode([t]) for t in nxt]), expected, rtol=0, atol=1e-5)


def test_state_after_ada_eviction_is_written_only_beside_its_mask(llama_cpp, tiny_path):
    # llama.cpp's state leaves out the per-head mask: it is written only once llama_kv_evict_seq_get_data has been
    # read since the mask last changed, and a load restores the mask from it (-1: the head holds no token there)
    ref = TinyRef(tiny_path)
    llm = pyllmkv.Llama(tiny_path, kv_budget=40, window=8, policy="criticalkv-ada", n_batch=32, verbose=False,
                        type_k=0, type_v=0)
    llm.eval(random_tokens(200, seed=33))
    held = held_positions(llm, ref)
    assert llm.kv_stats()["n_evictions"] > 0 and (held == -1).any()
    assert llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0) == 0  # llama.cpp reports the error and writes nothing
    assert "read llama_kv_evict_seq_get_data first" in _lib.last_error()
    data = _lib.seq_data(llm)
    assert llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0) > 0
    state = _save(llm)

    other = _llama(llama_cpp, tiny_path, n_batch=32)
    sess = Session(other, EvictConfig(budget=40, window=8, policy="criticalkv-ada"))
    sess.decode(random_tokens(60, seed=34))  # other cells and another mask first
    sess.evict()
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(other._ctx.ctx), 0, -1, -1)
    _load(other, state)
    _lib.set_seq_data(other, data)
    np.testing.assert_array_equal(held_positions(other, ref), held)
    assert llama_cpp.llama_state_seq_get_size(other._ctx.ctx, 0) == 0  # what it loaded is read again before a save

    llm.eval(random_tokens(60, seed=35))  # an eviction changes the mask: read it again
    assert llm.kv_stats()["n_evictions"] > 1
    assert llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0) == 0


def test_loading_a_state_resets_the_hooks_bookkeeping(llama_cpp, tiny_path):
    # a context whose cells carry an -ada per-head mask loads a state of plain cells at the same positions: none of
    # the old mask may apply to them
    source = _llama(llama_cpp, tiny_path)
    source_sess = Session(source)
    source_sess.decode(random_tokens(45, seed=34))
    data = _save(source)
    nxt = random_tokens(2, seed=35)
    expected = np.stack([source_sess.decode([t]) for t in nxt])

    llm = _llama(llama_cpp, tiny_path)
    sess = Session(llm, EvictConfig(budget=40, window=8, granularity="head", policy="snapkv-ada"))
    sess.decode(random_tokens(100, seed=36))
    sess.evict()
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm._ctx.ctx), 0, -1, -1)
    sess.n_past = _load(llm, data)
    np.testing.assert_allclose(np.stack([sess.decode([t]) for t in nxt]), expected, rtol=0, atol=1e-5)


def test_llama_cpp_python_save_and_load_state_after_head_compaction(tiny_path):
    # llama-cpp-python's own save_state/load_state on pyllmkv.Llama: a compacted conversation restored into a fresh
    # pyllmkv.Llama continues with the logits of the original, which renumbers the kept cells from 0 before that token
    # (renumber's default here): the restored one does too, though the state holds no eviction count
    def fresh():
        return pyllmkv.Llama(tiny_path, kv_budget=40, window=8, n_batch=32, policy="defensivekv-layer", verbose=False,
                             type_k=0, type_v=0)

    llm = fresh()
    prompt = random_tokens(150, seed=37)
    llm.eval(prompt)
    assert llm.kv_stats()["n_evictions"] > 0
    state = llm.save_state()
    def last_logits(m):
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m._ctx.ctx, -1), shape=(m.n_vocab(),)).copy()

    llm.eval([7])
    expected = last_logits(llm)

    other = fresh()
    other.load_state(state)
    other.eval([7])
    np.testing.assert_allclose(last_logits(other), expected, rtol=0, atol=1e-5)
    assert llm.evict_config.renumber and _lib.positions(other).max() < 40 + 32 < 150


def test_loaded_state_goes_on_at_the_renumbered_positions(tmp_path):
    # past the trained context (256) pyllmkv.Llama renumbers its cells: a state saved there carries how far positions
    # lag the tokens seen, so the restored conversation decodes its next token where the original does
    from tinymodel import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny-256.gguf", seed=5, n_ctx_train=256)

    def fresh():
        return pyllmkv.Llama(model, kv_budget=40, window=8, n_batch=32, n_ctx=1024, verbose=False, type_k=0, type_v=0)

    llm = fresh()
    llm.eval(random_tokens(400, seed=38))
    state = llm.save_state()
    assert _lib.positions(llm).max() < 256 and state.position_shift > 0
    llm.eval([7])
    other = fresh()
    other.load_state(state)
    other.eval([7])
    np.testing.assert_array_equal(_lib.positions(other), _lib.positions(llm))

    def last_logits(m):
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m._ctx.ctx, -1), shape=(m.n_vocab(),))

    np.testing.assert_allclose(last_logits(other), last_logits(llm), rtol=0, atol=1e-5)


def test_loaded_state_keeps_where_each_head_row_came_from(tiny_path):
    # head granularity moves rows between cells; a truncation after loading must drop the same cells as in the
    # context that saved the state (the one whose bookkeeping the numpy oracles of test_head_granularity check)
    def fresh():
        return pyllmkv.Llama(tiny_path, kv_budget=40, window=8, n_batch=32, policy="defensivekv-layer", verbose=False,
                             type_k=0, type_v=0)

    ref = TinyRef(tiny_path)
    llm = fresh()
    llm.eval(random_tokens(150, seed=38))
    state = llm.save_state()
    held = held_positions(llm, ref)
    cells = _lib.positions(llm)
    moved = np.sort(held[held > cells])  # rows that sit in a cell numbered below their token's
    assert len(moved) > 0
    cut = int(moved[len(moved) // 2])

    other = fresh()
    other.load_state(state)
    np.testing.assert_array_equal(held_positions(other, ref), held)
    # a state without them (as llama_cpp.Llama saves it) takes every row at its cell's position
    bare = fresh()
    bare_state = copy.copy(state)
    bare_state.kv_evict = None
    bare.load_state(bare_state)
    assert (held_positions(bare, ref) != held).any()

    def cut_and_continue(m):
        m.n_tokens = cut  # a prompt that diverges at `cut`, as llama-cpp-python's generate sets it
        m.eval([7])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m._ctx.ctx, -1), shape=(m.n_vocab(),)).copy()
        return _lib.positions(m), held_positions(m, ref), logits

    expected = cut_and_continue(llm)
    got = cut_and_continue(other)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
    # the bare load keeps cells holding moved rows of the removed tokens: the model attends to tokens it was told
    # to forget
    assert np.abs(cut_and_continue(bare)[2] - expected[2]).max() > 1e-2


def test_seq_data_is_refused_for_other_cells(tiny_path):
    llm = pyllmkv.Llama(tiny_path, kv_budget=40, window=8, n_batch=32, verbose=False, type_k=0, type_v=0)
    llm.eval(random_tokens(100, seed=39))
    data = _lib.seq_data(llm)
    llm.eval([5])
    with pytest.raises(KVEvictError, match="other cells than the sequence holds: load the state"):
        _lib.set_seq_data(llm, data)
    with pytest.raises(KVEvictError, match="not written by llama_kv_evict_seq_get_data"):
        _lib.set_seq_data(llm, data[:-4])


@pytest.mark.parametrize("policy", ["criticalkv", "h2o", "criticalkv-ada", "snapkv-ada"])
def test_loaded_state_evicts_as_the_original(tiny_path, policy):
    loaded_state_against_the_original(tiny_path, policy, atol=1e-5)


def loaded_state_against_the_original(path, policy, atol, **kw):
    """The window's queries, the H2O sums and an -ada cache's per-head mask travel with the state, so the evictions
    after a load choose the cells the original context chooses; the loading context held other tokens first, whose
    queries must not count. `atol` bounds the logits (and the positions' equality is exact whatever it is)."""
    def fresh():
        return pyllmkv.Llama(path, kv_budget=40, window=8, n_batch=32, policy=policy, verbose=False, type_k=0,
                             type_v=0, **kw)

    ref = TinyRef(path)
    llm = fresh()
    llm.eval(random_tokens(150, seed=40))
    state = llm.save_state()
    other = fresh()
    other.eval(random_tokens(60, seed=41))
    other.load_state(state)
    np.testing.assert_array_equal(held_positions(other, ref), held_positions(llm, ref))
    if policy.endswith("-ada"):
        assert (held_positions(llm, ref) == -1).any()  # the mask is not trivially all-held

    def go_on(m):
        before = m.kv_stats()["n_evictions"]
        m.eval(random_tokens(100, seed=42))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m._ctx.ctx, -1), shape=(m.n_vocab(),)).copy()
        return m.kv_stats()["n_evictions"] - before, _lib.positions(m), held_positions(m, ref), logits

    expected = go_on(llm)
    assert expected[0] >= 2
    got = go_on(other)
    assert got[0] == expected[0]
    for e, g in zip(expected[1:-1], got[1:-1]):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_allclose(got[-1], expected[-1], rtol=0, atol=atol)
