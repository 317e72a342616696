"""ctypes bindings of the eviction hook that pyllmkv's patch adds to llama.h.

llama-cpp-python loads the shared library named by LLAMA_CPP_LIB_PATH; pyllmkv points it at the patched build
shipped in this package before llama_cpp is imported, so llama_cpp and these bindings share one libllama.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ._preload import libstdcxx_global


def lib_dir() -> Path:
    """The folder holding the patched libllama: $PYLLMKV_LIB_DIR, else pyllmkv/lib of the installed package."""
    env = os.environ.get("PYLLMKV_LIB_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "lib"


def _load_llama_cpp():
    if "llama_cpp" not in sys.modules:
        if not (lib_dir() / "libllama.so").exists() and not any(lib_dir().glob("*llama.*")):
            raise ImportError(
                f"pyllmkv's patched libllama is not in {lib_dir()}: install pyllmkv with `pip install .` "
                "(it builds the library), or set PYLLMKV_LIB_DIR to a build's bin folder"
            )
        os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir())
        libstdcxx_global()
    import llama_cpp

    lib = llama_cpp.llama_cpp._lib
    if not hasattr(lib, "llama_kv_evict_enable"):
        raise ImportError(
            "llama_cpp was loaded with a libllama without pyllmkv's hook "
            f"({os.environ.get('LLAMA_CPP_LIB_PATH', 'its own build')}): import pyllmkv before llama_cpp"
        )
    return llama_cpp, lib


llama_cpp, _lib = _load_llama_cpp()

GRANULARITIES = {"token": 0, "head": 1}


ERR_INVALID = -1
ERR_NO_QUERIES = -5  # llama_kv_evict before any decode captured the window's queries


class KVEvictError(RuntimeError):
    """An error reported by the hook; `code` is the C error code, the message is the hook's own."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class EvictParams(ctypes.Structure):
    _fields_ = [
        ("policy", ctypes.c_int),
        ("granularity", ctypes.c_int),
        ("budget", ctypes.c_int32),
        ("window", ctypes.c_int32),
        ("pool_kernel", ctypes.c_int32),
        ("first_stage_ratio", ctypes.c_float),
        ("epsilon", ctypes.c_float),
        ("n_sink", ctypes.c_int32),
        ("ada_alpha", ctypes.c_float),
    ]


class PolicyInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("scorer", ctypes.c_char_p),
        ("rescale", ctypes.c_char_p),
        ("allocation", ctypes.c_char_p),
        ("shares_heads", ctypes.c_bool),
        ("given_share", ctypes.c_float),
    ]


class EvictStats(ctypes.Structure):
    _fields_ = [
        ("n_cells_used", ctypes.c_int32),
        ("n_seq_cells", ctypes.c_int32),
        ("kv_size", ctypes.c_int32),
        ("n_evictions", ctypes.c_int32),
        ("n_evicted", ctypes.c_int64),
        ("t_evict_us", ctypes.c_int64),
        ("kv_bytes", ctypes.c_size_t),
        ("value_norm_kernel", ctypes.c_int32),
        ("window_attn_kernel", ctypes.c_int32),
        ("scoring_bytes", ctypes.c_size_t),
        ("compact_kernel", ctypes.c_int32),
    ]


_ctx_p = ctypes.c_void_p
_f_p = ctypes.POINTER(ctypes.c_float)
_i32_p = ctypes.POINTER(ctypes.c_int32)


def _bind(name, argtypes, restype):
    fn = getattr(_lib, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


_default_params = _bind("llama_kv_evict_default_params", [], EvictParams)
_enable = _bind("llama_kv_evict_enable", [_ctx_p, ctypes.POINTER(EvictParams)], ctypes.c_int32)
_disable = _bind("llama_kv_evict_disable", [_ctx_p], None)
_evict = _bind("llama_kv_evict", [_ctx_p, ctypes.c_int32], ctypes.c_int32)
_probe = _bind("llama_kv_evict_probe", [_ctx_p, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32)
_scores = _bind("llama_kv_evict_scores", [_ctx_p, ctypes.c_int32, ctypes.c_int32, _i32_p, _f_p, _f_p, ctypes.c_int32], ctypes.c_int32)
_compact_positions = _bind("llama_kv_evict_compact_positions", [_ctx_p, ctypes.c_int32], ctypes.c_int32)
_seq_get_data = _bind("llama_kv_evict_seq_get_data", [_ctx_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int64)
_seq_set_data = _bind("llama_kv_evict_seq_set_data", [_ctx_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32)
_get_window_queries = _bind("llama_kv_evict_get_window_queries", [_ctx_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int64)
_set_window_queries = _bind("llama_kv_evict_set_window_queries", [_ctx_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32)
_set_token_scores = _bind("llama_kv_evict_set_token_scores", [_ctx_p, ctypes.c_int32, _i32_p, _f_p, ctypes.c_int32], ctypes.c_int32)
_positions = _bind("llama_kv_evict_positions", [_ctx_p, ctypes.c_int32, _i32_p, ctypes.c_int32], ctypes.c_int32)
_get_stats = _bind("llama_kv_evict_get_stats", [_ctx_p, ctypes.c_int32, ctypes.POINTER(EvictStats)], ctypes.c_int32)
_last_error = _bind("llama_kv_evict_last_error", [], ctypes.c_char_p)
_describe = _bind("llama_kv_evict_policy_describe", [ctypes.c_int32, ctypes.POINTER(PolicyInfo)], ctypes.c_int32)
_validate = _bind("llama_kv_evict_validate", [ctypes.POINTER(EvictParams)], ctypes.c_int32)
_max_cells = _bind("llama_kv_evict_max_cells", [ctypes.POINTER(EvictParams)], ctypes.c_int32)


# How a model kept on the CPU lays out its weights: "plain" (the default), ggml's row layout, which the fused value-norm
# kernel reads; "repack", llama.cpp's repacked layouts (CPU_REPACK) for all but W_O, which a buffer type of pyllmkv's
# own keeps plain; "repack-all", as stock llama.cpp loads it (the norms then run as a ggml graph). docs/results.md
# weighs them.
CPU_WEIGHTS = ("plain", "repack", "repack-all")
_cpu_weights = "plain"
_model_init = llama_cpp._internals.LlamaModel.__init__
_plain_cpu_buffer_type = _bind("llama_kv_evict_plain_cpu_buffer_type", [], ctypes.c_void_p)


class _BuftOverride(ctypes.Structure):  # llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


# W_O (with its scale, where a model has one) of every layer in the plain buffer type; the list ends with a null pattern
_PLAIN_W_O = (_BuftOverride * 2)(_BuftOverride(rb"\.attn_output\.", _plain_cpu_buffer_type()), _BuftOverride(None, None))


@contextmanager
def cpu_weights(layout: str):
    """Models loaded inside this block lay out the weights they keep on the CPU as `layout`, one of CPU_WEIGHTS."""
    global _cpu_weights
    if layout not in CPU_WEIGHTS:
        raise ValueError(f"unknown weight layout {layout!r}: choose one of {', '.join(CPU_WEIGHTS)}")
    previous, _cpu_weights = _cpu_weights, layout
    try:
        yield
    finally:
        _cpu_weights = previous


def _init_model(self, *, path_model, params, verbose=True):
    if params.n_gpu_layers == 0 and _cpu_weights == "plain":
        params.use_extra_bufts = False
    elif params.n_gpu_layers == 0 and _cpu_weights == "repack" and not params.tensor_buft_overrides:
        params.tensor_buft_overrides = ctypes.cast(_PLAIN_W_O, ctypes.c_void_p)
    _model_init(self, path_model=path_model, params=params, verbose=verbose)


llama_cpp._internals.LlamaModel.__init__ = _init_model


def last_error() -> str:
    """The hook's last error message on this thread ("" if none)."""
    return _last_error().decode("utf-8", "replace")


def _check(rc: int) -> int:
    if rc < 0:
        raise KVEvictError(rc, _last_error().decode("utf-8", "replace"))
    return rc


def _ctx(ctx) -> int:
    """Accepts a raw llama_context pointer, llama_cpp's internal context wrapper, or a llama_cpp.Llama."""
    if hasattr(ctx, "_ctx"):  # llama_cpp.Llama
        ctx = ctx._ctx
    if hasattr(ctx, "ctx"):  # llama_cpp._internals.LlamaContext
        ctx = ctx.ctx
    if isinstance(ctx, ctypes.c_void_p):
        return ctx.value
    return ctx


@dataclass(frozen=True)
class Policy:
    """A policy as the library composes it (native/kv-evict-policy.h): what scores a cell, what reweighs the score by
    the cell's projected value, how the kept cells are shared among heads."""
    name: str
    value: int  # llama_kv_evict_policy
    scorer: str
    rescale: str
    allocation: str
    shares_heads: bool  # unequal head shares: granularity head only, up to 2 x budget - window cells
    given_share: float  # share of the budget kept by the caller's token scores before the scorer's choice

    @property
    def token_scores(self) -> bool:
        """Ranks cells, or a share of them, by the scores the caller gives their tokens (set_token_scores; surprisal)."""
        return self.scorer == "given" or self.given_share > 0

    @property
    def reads_queries(self) -> bool:
        """Scores cells by the window's queries, so a long prompt is evicted with its tail's (session.PromptTail)."""
        return self.scorer not in ("recency", "key-norm", "given")


def _policies() -> dict:
    info = PolicyInfo()
    n = _describe(0, ctypes.byref(info))
    out = {}
    for value in range(n):
        _describe(value, ctypes.byref(info))
        d = {f: getattr(info, f) for f in ("name", "scorer", "rescale", "allocation")}
        out[d["name"].decode()] = Policy(value=value, shares_heads=bool(info.shares_heads), given_share=float(info.given_share),
                                         **{k: v.decode() for k, v in d.items()})
    return out


# every policy the library has, by name, in the library's order
POLICY_INFO = _policies()
POLICIES = {name: p.value for name, p in POLICY_INFO.items()}


def _c_defaults() -> dict:
    """llama_kv_evict_default_params as EvictConfig's fields: the one place the defaults are written."""
    p = _default_params()
    names = {v: k for k, v in POLICIES.items()}
    out = {"policy": names[p.policy], "granularity": {v: k for k, v in GRANULARITIES.items()}[p.granularity]}
    for name in ("budget", "window", "pool_kernel", "n_sink"):
        out[name] = int(getattr(p, name))
    for name in ("first_stage_ratio", "epsilon", "ada_alpha"):
        out[name] = float(f"{getattr(p, name):.7g}")  # as written in C, not float32's nearest double
    return out


_DEFAULTS = _c_defaults()


@dataclass
class EvictConfig:
    """Parameters of the hook; the defaults are llama_kv_evict_default_params's: the paper's and kvpress's, but for a
    wider pooling kernel (13, not 5) that keeps a retrieved span whole."""

    budget: int = _DEFAULTS["budget"]
    policy: str = _DEFAULTS["policy"]
    granularity: str = _DEFAULTS["granularity"]
    window: int = _DEFAULTS["window"]
    pool_kernel: int = _DEFAULTS["pool_kernel"]
    first_stage_ratio: float = _DEFAULTS["first_stage_ratio"]
    epsilon: float = _DEFAULTS["epsilon"]
    n_sink: int = _DEFAULTS["n_sink"]
    ada_alpha: float = _DEFAULTS["ada_alpha"]
    # a prompt decoded in several batches is evicted with the queries of its last `window` tokens (session.PromptTail)
    prompt_tail: bool = True
    # each eviction is scored by a request to repeat the text read since the last one (session.RepeatProbe), not by
    # the window's queries; the prompt tail then goes unused
    repeat_probe: bool = False
    # a prompt (or token) decoded after an eviction reads the kept cells renumbered from 0 (session.make_room), as
    # consecutive text, not across the positions the evicted text left empty
    renumber: bool = False

    def __post_init__(self):
        if self.repeat_probe and self.token_scores:
            raise ValueError(f"policy {self.policy} ranks cells by their tokens' surprisal, which a probe's queries do not "
                             "give: leave repeat_probe off, or choose a policy the queries rank, such as defensivekv-layer")

    @property
    def token_scores(self) -> bool:
        """The policy ranks cells by the scores the decoder gives their tokens (surprisal: pyllmkv.surprisal)."""
        return POLICY_INFO[self.policy].token_scores if self.policy in POLICY_INFO else False

    @property
    def cells(self) -> int:
        """Most cells the sequence holds after an eviction: the budget; with a policy that shares heads unequally the
        window plus the largest head share, which the hook caps at twice the per-head budget (llama_kv_evict_max_cells).
        Raises KVEvictError for invalid parameters."""
        return _check(_max_cells(ctypes.byref(self.to_c())))

    @classmethod
    def for_cells(cls, cells: int, **kwargs) -> "EvictConfig":
        """The config that holds at most `cells` cells per sequence after an eviction: the memory bound a user gives as
        --kv-budget. `budget` is `cells`, or with a policy that shares heads the largest per-head budget whose `cells`
        fits (about (cells + window) / 2). Raises KVEvictError for invalid parameters or too few cells."""
        config = cls(budget=cells, **kwargs)
        if config.cells <= cells:
            return config

        def fits(budget: int) -> bool:  # too small a budget to be valid counts as fitting: the cells grow with it
            params = cls(budget=budget, **kwargs).to_c()
            return _validate(ctypes.byref(params)) < 0 or _max_cells(ctypes.byref(params)) <= cells

        lo, hi = 1, cells - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        config = cls(budget=lo, **kwargs)
        try:
            config.validate()
        except KVEvictError as e:
            raise KVEvictError(e.code, f"{cells} cells are too few for policy {config.policy}, whose heads share them "
                                       f"(each about (cells + window) / 2 on average): {e}") from None
        return config

    def validate(self) -> None:
        """Raises KVEvictError with the hook's reason if the parameters are invalid, before any model loads."""
        _check(_validate(ctypes.byref(self.to_c())))

    def to_c(self) -> EvictParams:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}: choose one of {', '.join(GRANULARITIES)}")
        p = _default_params()
        p.policy = POLICIES[self.policy]
        p.granularity = GRANULARITIES[self.granularity]
        for name in ("budget", "window", "pool_kernel", "first_stage_ratio", "epsilon", "n_sink", "ada_alpha"):
            setattr(p, name, getattr(self, name))
        return p


# pyllmkv's policy for its own decoders (chat, serve, pyllmkv.Llama), which give the hook every token's surprisal: it
# keeps a document's facts for a question asked later (README, "The default policy"). EvictConfig's default, the
# hook's, needs no token scores: Sequences, `serve --parallel` and C callers use it
DEFAULT_POLICY = "defensivekv-surprisal"


def default_config() -> EvictConfig:
    """The hook's defaults (llama_kv_evict_default_params), as EvictConfig() has them."""
    return EvictConfig()


def can_renumber(ctx) -> bool:
    """The context's cache can shift its cells' positions: RoPE shift in K, and no sliding-window cache smaller than
    the full one."""
    return bool(llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(_ctx(ctx))))


def renumber_where_it_can(ctx, config: EvictConfig, renumber: Optional[bool]) -> EvictConfig:
    """`config` with renumber as asked; None, the default of pyllmkv's own decoders (chat, serve, pyllmkv.Llama): on
    where the context's cache can shift positions (it kept more of a document's facts for a later question: README)."""
    return replace(config, renumber=can_renumber(ctx) if renumber is None else renumber)


def enable(ctx, config: EvictConfig) -> None:
    """Evicts the context's sequences with `config` from now on. Refuses config.renumber where the cache cannot shift
    positions (no RoPE shift in K, or a sliding-window cache smaller than the full one): it could never renumber."""
    if config.renumber and not can_renumber(ctx):
        raise ValueError("renumber shifts the kept cells' positions, and this model's cache cannot shift them (no RoPE "
                         "shift, or a sliding-window cache smaller than the full one): leave renumber off")
    params = config.to_c()
    _check(_enable(_ctx(ctx), ctypes.byref(params)))


def disable(ctx) -> None:
    _disable(_ctx(ctx))


def evict(ctx, seq_id: int = 0) -> int:
    """Evicts seq_id down to the budget if it holds more; returns the number of cells removed."""
    return _check(_evict(_ctx(ctx), seq_id))


def probe(ctx, p_end: int, seq_id: int = 0) -> None:
    """Folds the window's queries, those of a probe decoded from position p_end on, into what the cells below p_end
    keep (their maximum score over probes; for DefensiveKV what its scorer needs, to rank as one window of every probe
    query since the last eviction); the next evict ranks the cells by them. Remove the probe's cells first."""
    _check(_probe(_ctx(ctx), seq_id, p_end))


def compact_positions(ctx, seq_id: int = 0) -> int:
    """Renumbers the sequence's cells to 0..n-1 (llama.cpp shifts RoPE in K); returns n, the next position."""
    return _check(_compact_positions(_ctx(ctx), seq_id))


def positions(ctx, seq_id: int = 0) -> np.ndarray:
    n = _check(_positions(_ctx(ctx), seq_id, None, 0))
    out = np.zeros(n, dtype=np.int32)
    _check(_positions(_ctx(ctx), seq_id, out.ctypes.data_as(_i32_p), n))
    return out


def scores(ctx, layer: int, n_head_kv: int, seq_id: int = 0, value_norms: bool = True):
    """Scores of one layer as the next eviction would use them: (pos [n], score [n_head_kv, n], value_norm or None)."""
    # the scored cells are the sequence's less its window: sized by the cell count, so the scores are computed once
    n_max = _check(_positions(_ctx(ctx), seq_id, None, 0))
    pos = np.zeros(n_max, dtype=np.int32)
    score = np.zeros(n_head_kv * n_max, dtype=np.float32)
    norm = np.zeros(n_head_kv * n_max, dtype=np.float32) if value_norms else None
    n = _check(_scores(
        _ctx(ctx), seq_id, layer, pos.ctypes.data_as(_i32_p), score.ctypes.data_as(_f_p),
        norm.ctypes.data_as(_f_p) if value_norms else None, n_max,
    ))
    # the library lays out min(n, n_max) = n columns per head
    score = score[: n_head_kv * n].reshape(n_head_kv, n)
    norm = norm[: n_head_kv * n].reshape(n_head_kv, n) if value_norms else None
    return pos[:n], score, norm



def _get_bytes(fn, ctx, seq_id: int) -> bytes:
    """What a `fn(ctx, seq_id, out, size)` of the C API writes: asked for its size first, then filled."""
    need = _check(fn(_ctx(ctx), seq_id, None, 0))
    out = ctypes.create_string_buffer(need)
    _check(fn(_ctx(ctx), seq_id, out, need))
    return out.raw


def seq_data(ctx, seq_id: int = 0) -> bytes:
    """What a llama.cpp state of the sequence leaves out (the position each KV head's row was given, the window's
    queries, the H2O sums), to save beside it."""
    return _get_bytes(_seq_get_data, ctx, seq_id)


def window_queries(ctx, seq_id: int = 0) -> bytes:
    """The window's captured queries, every layer of the cache, as set_window_queries takes them."""
    return _get_bytes(_get_window_queries, ctx, seq_id)


def set_window_queries(ctx, data: bytes, seq_id: int = 0) -> None:
    """Makes window_queries' bytes from a context of the same model and window the queries the next evict scores with."""
    _check(_set_window_queries(_ctx(ctx), seq_id, data, len(data)))


def set_token_scores(ctx, pos: np.ndarray, score: np.ndarray, seq_id: int = 0) -> None:
    """Gives the tokens at positions `pos` of the sequence the scores a policy of scorer "given" (surprisal) ranks
    their cells by."""
    pos = np.ascontiguousarray(pos, dtype=np.int32)
    score = np.ascontiguousarray(score, dtype=np.float32)
    if pos.shape != score.shape:
        raise ValueError(f"pos and score differ in shape ({pos.shape} and {score.shape})")
    _check(_set_token_scores(_ctx(ctx), seq_id, pos.ctypes.data_as(_i32_p), score.ctypes.data_as(_f_p), len(pos)))


def set_seq_data(ctx, data: bytes, seq_id: int = 0) -> None:
    """Restores seq_data's bytes, right after loading the state saved beside them."""
    _check(_seq_set_data(_ctx(ctx), seq_id, data, len(data)))





SCORING_KERNELS = {0: "none", 1: "ggml-graph", 2: "fused-cpu", 3: "fused-cuda", 4: "fused-cpu-int8"}


def stats(ctx, seq_id: int = 0) -> dict:
    """Counters from llama.cpp and the hook; value_norm_kernel, window_attn_kernel and compact_kernel name what
    computed the projected-value norms and the window attention last, and moved a transposed V cache's rows."""
    s = EvictStats()
    _check(_get_stats(_ctx(ctx), seq_id, ctypes.byref(s)))
    out = {name: getattr(s, name) for name, _ in EvictStats._fields_}
    for key in ("value_norm_kernel", "window_attn_kernel", "compact_kernel"):
        out[key] = SCORING_KERNELS.get(out[key], str(out[key]))
    return out
