"""The hook's debug and test entry points (native/llama-kv-evict-debug.h, kept out of llama.h): what each KV head
holds, the cache's raw rows, the captured queries, AdaKV's allocation alone, where evictions spend their time. The tests and the bench's perturbation
suite read them; a user of the cache needs none."""

from __future__ import annotations

import ctypes

import numpy as np

from ._lib import _bind, _check, _ctx, _ctx_p, _f_p, _i32_p

_head_positions = _bind("llama_kv_evict_head_positions", [_ctx_p, ctypes.c_int32, ctypes.c_int32, _i32_p, ctypes.c_int32], ctypes.c_int32)
_read_rows = _bind("llama_kv_evict_read_rows", [_ctx_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_bool, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int64)
_queries = _bind("llama_kv_evict_queries", [_ctx_p, ctypes.c_int32, ctypes.c_int32, _i32_p, _f_p, ctypes.c_int32, _i32_p, _f_p], ctypes.c_int32)
_profile = _bind("llama_kv_evict_profile", [_ctx_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int64), ctypes.c_int32], ctypes.c_int32)
_adakv_shares = _bind("llama_kv_evict_adakv_shares", [_f_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_float, ctypes.c_int32, _i32_p], ctypes.c_int32)


def head_positions(ctx, layer: int, n_head_kv: int, seq_id: int = 0) -> np.ndarray:
    """[n_head_kv, n_cells]: the position each KV head's token had when decoded (debug; moves with compaction)."""
    n = _check(_head_positions(_ctx(ctx), seq_id, layer, None, 0))
    out = np.zeros((n_head_kv, n), dtype=np.int32)
    _check(_head_positions(_ctx(ctx), seq_id, layer, out.ctypes.data_as(_i32_p), n))
    return out


def read_rows(ctx, layer: int, is_v: bool, n_cells: int, seq_id: int = 0) -> np.ndarray:
    """[n_cells, row bytes]: the raw bytes of layer's K or V rows of the sequence's cells in position order (debug)."""
    need = _check(_read_rows(_ctx(ctx), seq_id, layer, is_v, None, 0))
    out = np.zeros(need, dtype=np.uint8)
    _check(_read_rows(_ctx(ctx), seq_id, layer, is_v, out.ctypes.data, need))
    return out.reshape(n_cells, -1)


def queries(ctx, layer: int, seq_id: int = 0):
    """The observation window's queries of one layer as the hook captured them, after RoPE (debug):
    (pos [n], q [n, n_head * head_dim], kq_scale)."""
    n_embd_q = ctypes.c_int32()
    n = _check(_queries(_ctx(ctx), seq_id, layer, None, None, 0, ctypes.byref(n_embd_q), None))
    pos = np.zeros(n, dtype=np.int32)
    q = np.zeros((n, n_embd_q.value), dtype=np.float32)
    scale = ctypes.c_float()
    _check(_queries(_ctx(ctx), seq_id, layer, pos.ctypes.data_as(_i32_p), q.ctypes.data_as(_f_p), n, None, ctypes.byref(scale)))
    return pos, q, scale.value


PHASES = ("settle", "norms", "score", "select", "compact")


def profile(ctx, seq_id: int = 0) -> dict:
    """Seconds the evictions of seq_id spent, by phase (llama_kv_evict_profile): waiting for the running decode, value
    norms of new cells, the rest of scoring, choosing the kept cells, compaction and removal; they sum to t_evict_us."""
    t_us = (ctypes.c_int64 * len(PHASES))()
    _check(_profile(_ctx(ctx), seq_id, t_us, len(PHASES)))
    return {name: t / 1e6 for name, t in zip(PHASES, t_us)}


def adakv_shares(scores: np.ndarray, budget: int, alpha: float, cap: int) -> np.ndarray:
    """AdaKV's allocation as the -ada policies compute it: cells each head keeps, given scores [n_head, n]."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    share = np.zeros(scores.shape[0], dtype=np.int32)
    _check(_adakv_shares(scores.ctypes.data_as(_f_p), scores.shape[0], scores.shape[1], budget, alpha, cap, share.ctypes.data_as(_i32_p)))
    return share
