"""Tiny random-weight llama GGUF models plus an exact numpy reference.

`write_tiny_llama` writes a small GQA model of architecture ``llama`` that
llama.cpp loads like any real checkpoint.  `TinyRef` re-implements llama.cpp's
LLM_ARCH_LLAMA graph in float64 numpy, including a simulated KV cache from which
cells can be evicted (globally or per layer / per KV head), so that KV-cache
manipulations done through llama.cpp can be checked against ground truth.

Conventions (ggml `ne` order is reversed w.r.t. numpy shapes):

* a GGUF weight with ggml shape ``{n_in, n_out}`` is stored by numpy/gguf-py as
  an array ``[n_out, n_in]`` (torch ``nn.Linear`` layout); `TinyRef` keeps the
  transposed ``[n_in, n_out]`` so that ``y = x @ W``.
* RoPE is LLAMA_ROPE_TYPE_NORM (the type llama.cpp uses for LLM_ARCH_LLAMA):
  it rotates *adjacent* pairs ``(x[2i], x[2i+1])`` by ``pos * base**(-2i/d)``.
  Because the weights are random there is no HF q/k permutation to undo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import gguf

__all__ = [
    "write_tiny_llama",
    "write_tiny_mamba",
    "TinyRef",
    "LayerTrace",
    "Trace",
    "BOS_ID",
    "EOS_ID",
    "UNK_ID",
    "SPACE_ID",
    "FIRST_BYTE_ID",
]

# Vocabulary layout (SPM / tokenizer model "llama"):
#   0 <unk>, 1 <s>, 2 </s>, 3 "\u2581" (SPM's escaped space), then byte tokens
#   <0x00>, <0x01>, ... (as many as fit), then filler tokens if n_vocab > 260.
# With the default n_vocab=256 the bytes 0x00..0xFB are present, which covers
# every byte that can occur in valid UTF-8 (0xF5..0xFF never do), so any text
# tokenizes via byte fallback, one token per byte except ' ' -> SPACE_ID.
# The explicit space token matters: SPM turns ' ' into U+2581 before lookup,
# and if that came back as byte tokens, detokenize would not map it back.
UNK_ID, BOS_ID, EOS_ID, SPACE_ID = 0, 1, 2, 3
FIRST_BYTE_ID = 4  # token id of byte b is FIRST_BYTE_ID + b


def _vocab(n_vocab: int):
    if n_vocab < FIRST_BYTE_ID + 0x0B:
        # llama.cpp wants <0x0A> for its newline token; be strict rather than
        # produce a model whose tokenizer misbehaves.
        raise ValueError(f"n_vocab must be >= {FIRST_BYTE_ID + 0x0B} (specials + bytes up to '\\n')")
    tokens = ["<unk>", "<s>", "</s>", "\u2581"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.NORMAL]
    n_bytes = min(256, n_vocab - len(tokens))
    tokens += [f"<0x{b:02X}>" for b in range(n_bytes)]
    types += [gguf.TokenType.BYTE] * n_bytes
    tokens += [f"\u2581tok{i}" for i in range(len(tokens), n_vocab)]
    types += [gguf.TokenType.NORMAL] * (n_vocab - len(types))
    return tokens, [0.0] * n_vocab, [int(t) for t in types]


def _finish(w, n_vocab: int, tensors, path) -> str:
    """Writes the vocabulary and the tensors, closes the file; returns its path as str (llama_cpp wants str)."""
    tokens, scores, types = _vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # No implicit leading space: tokenize(b"ab") is exactly [<s>, a, b].
    w.add_add_space_prefix(False)

    for name, arr in tensors:
        if isinstance(arr, tuple):  # (raw bytes, quantisation type)
            w.add_tensor(name, arr[0], raw_dtype=arr[1])
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def write_tiny_llama(
    path,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 32,
    n_ff: int = 256,
    n_vocab: int = 256,
    n_ctx_train: int = 4096,
    dtype: str = "f32",
    rms_eps: float = 1e-5,
    rope_freq_base: float = 10000.0,
    tie_embeddings: bool = False,
    qk_scale: float = 1.5,
) -> str:
    """Write a deterministic random-weight llama GGUF; return its path as str.

    (str, not Path: llama_cpp.Llama calls ``model_path.encode()``.)

    ``dtype`` ("f32", "f16" or "q4_0") applies to the 2-D matrices (q4_0: the
    layers' only, as llama.cpp's own Q4_0 files); 1-D norm weights stay f32
    like real converted checkpoints.  ``qk_scale`` sets the std of a
    q.k/sqrt(d) logit to roughly ``qk_scale**2`` so attention is peaked but not
    one-hot.
    """
    if dtype not in ("f32", "f16", "q4_0"):
        raise ValueError(f"dtype must be 'f32', 'f16' or 'q4_0', got {dtype!r}")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    if head_dim % 2:
        raise ValueError("head_dim must be even (RoPE rotates pairs)")
    path = Path(path)
    rng = np.random.default_rng(seed)
    mat_dtype = np.float16 if dtype == "f16" else np.float32

    def mat(n_out, n_in, std):
        # Always draw f32 first so the stream of random numbers (and hence the
        # model) does not depend on dtype beyond the final rounding.
        return (rng.standard_normal((n_out, n_in), dtype=np.float32) * std).astype(mat_dtype)

    def norm_w(n):
        # Not all-ones so that a missing norm weight would show up as an error.
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    n_q, n_kv = n_head * head_dim, n_head_kv * head_dim
    tensors = []  # keep order deterministic and llama.cpp-like
    # std 1 embedding: the residual stream starts at O(1) RMS.  When it doubles
    # as the lm head, shrink it like output.weight or logits blow up to ~100.
    embd_std = 2.0 / np.sqrt(n_embd) if tie_embeddings else 1.0
    tensors.append(("token_embd.weight", mat(n_vocab, n_embd, embd_std)))
    for il in range(n_layer):
        p = f"blk.{il}."
        tensors += [
            (p + "attn_norm.weight", norm_w(n_embd)),
            # RMS-normed input has unit-variance entries, so each q/k entry has
            # std qk_scale and q.k/sqrt(d) has std ~ qk_scale**2.
            (p + "attn_q.weight", mat(n_q, n_embd, qk_scale / np.sqrt(n_embd))),
            (p + "attn_k.weight", mat(n_kv, n_embd, qk_scale / np.sqrt(n_embd))),
            (p + "attn_v.weight", mat(n_kv, n_embd, 1.0 / np.sqrt(n_embd))),
            (p + "attn_output.weight", mat(n_embd, n_q, 0.5 / np.sqrt(n_q))),
            (p + "ffn_norm.weight", norm_w(n_embd)),
            (p + "ffn_gate.weight", mat(n_ff, n_embd, 1.0 / np.sqrt(n_embd))),
            (p + "ffn_up.weight", mat(n_ff, n_embd, 1.0 / np.sqrt(n_embd))),
            (p + "ffn_down.weight", mat(n_embd, n_ff, 0.5 / np.sqrt(n_ff))),
        ]
    tensors.append(("output_norm.weight", norm_w(n_embd)))
    if not tie_embeddings:
        tensors.append(("output.weight", mat(n_vocab, n_embd, 2.0 / np.sqrt(n_embd))))
    if dtype == "q4_0":
        q4_0 = gguf.GGMLQuantizationType.Q4_0
        tensors = [(name, (gguf.quants.quantize(a, q4_0), q4_0)) if name.startswith("blk.") and a.ndim == 2 else (name, a)
                   for name, a in tensors]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("pyllmkv-tiny-llama")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype])
    w.add_vocab_size(n_vocab)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    # Explicit so head_dim may differ from n_embd / n_head; llama.cpp asserts
    # n_rot == head_dim for this arch.
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope_freq_base))
    w.add_layer_norm_rms_eps(float(rms_eps))

    return _finish(w, n_vocab, tensors, path)


def write_tiny_mamba(path, seed: int = 0, n_layer: int = 2, n_embd: int = 64) -> str:
    """Write a deterministic random-weight GGUF of architecture ``mamba``; return its path as str.

    A recurrent (state-space) model: llama.cpp gives it a recurrent-state
    memory instead of a KV cache.  Same vocabulary as `write_tiny_llama`
    (n_vocab=256).  llama.cpp (LLM_ARCH_MAMBA) only supports an expansion
    factor of 2, so d_inner = 2*n_embd; d_conv=4, d_state=16,
    dt_rank=ceil(n_embd/16) as in the reference Mamba config.  All tensors f32.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    n_vocab, n_ctx_train = 256, 4096
    d_inner, d_conv, d_state = 2 * n_embd, 4, 16
    dt_rank = -(-n_embd // 16)

    def mat(n_out, n_in, std):  # numpy [n_out, n_in] == ggml {n_in, n_out}
        return (rng.standard_normal((n_out, n_in), dtype=np.float32) * std).astype(np.float32)

    def norm_w(n):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    tensors = [("token_embd.weight", mat(n_vocab, n_embd, 1.0))]
    for il in range(n_layer):
        p = f"blk.{il}."
        # dt initialised log-uniformly in [1e-3, 1e-1] via the softplus inverse
        # of the bias, A = -[1..d_state] per channel (the S4D-real init).
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), d_inner))
        dt_bias = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
        a = -np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1))
        tensors += [
            (p + "attn_norm.weight", norm_w(n_embd)),
            (p + "ssm_in.weight", mat(2 * d_inner, n_embd, 1.0 / np.sqrt(n_embd))),
            (p + "ssm_conv1d.weight", mat(d_inner, d_conv, 1.0 / np.sqrt(d_conv))),
            (p + "ssm_conv1d.bias", (0.1 * rng.standard_normal(d_inner, dtype=np.float32)).astype(np.float32)),
            (p + "ssm_x.weight", mat(dt_rank + 2 * d_state, d_inner, 1.0 / np.sqrt(d_inner))),
            (p + "ssm_dt.weight", mat(d_inner, dt_rank, 1.0 / np.sqrt(dt_rank))),
            (p + "ssm_dt.bias", dt_bias),
            (p + "ssm_a", a.astype(np.float32)),  # ggml {d_state, d_inner}
            (p + "ssm_d", np.ones(d_inner, dtype=np.float32)),
            (p + "ssm_out.weight", mat(n_embd, d_inner, 0.5 / np.sqrt(d_inner))),
        ]
    tensors.append(("output_norm.weight", norm_w(n_embd)))
    tensors.append(("output.weight", mat(n_vocab, n_embd, 2.0 / np.sqrt(n_embd))))

    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_name("pyllmkv-tiny-mamba")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(n_vocab)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(0)  # unused, as in convert_hf_to_gguf's Mamba
    w.add_head_count(0)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(dt_rank)
    w.add_layer_norm_rms_eps(1e-5)

    return _finish(w, n_vocab, tensors, path)


# --------------------------------------------------------------------------
# numpy reference
# --------------------------------------------------------------------------


@dataclass
class LayerTrace:
    """Per-layer intermediates of a forward pass (all float64)."""

    q: np.ndarray  # [n_tokens, n_head, head_dim], post-RoPE
    k: np.ndarray  # [n_tokens, n_head_kv, head_dim], post-RoPE (as cached)
    v: np.ndarray  # [n_tokens, n_head_kv, head_dim] (as cached)
    attn_heads: np.ndarray  # [n_tokens, n_head, head_dim], softmax(qk)v per head
    attn_out: np.ndarray  # [n_tokens, n_embd] = attn_heads.reshape(n, -1) @ wo
    h_in: np.ndarray  # [n_tokens, n_embd] residual stream entering the layer
    h_out: np.ndarray  # [n_tokens, n_embd] residual stream leaving the layer


@dataclass
class Trace:
    positions: np.ndarray  # [n_tokens]
    layers: list  # list[LayerTrace]
    logits: np.ndarray  # [n_tokens, n_vocab]


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


_HADAMARD_64 = _sylvester(64)


def hadamard64(x: np.ndarray) -> np.ndarray:
    """x with its last axis rotated in blocks of 64 by the Walsh-Hadamard matrix llama.cpp applies (its own inverse)."""
    return (x.reshape(*x.shape[:-1], -1, 64) @ _HADAMARD_64).reshape(x.shape)


class _Layer:
    pass


class TinyRef:
    """float64 numpy forward pass of llama.cpp's LLM_ARCH_LLAMA graph.

    ``kv_cache_dtype="f16"`` rounds cached K and V to float16 before attention,
    which is what llama.cpp's default KV cache does; leave it ``None`` for the
    exact model.
    """

    def __init__(self, path, kv_cache_dtype: Optional[str] = None):
        if kv_cache_dtype not in (None, "f32", "f16", "q8_0"):
            raise ValueError("kv_cache_dtype must be None, 'f32', 'f16' or 'q8_0'")
        self.kv_cache_dtype = kv_cache_dtype
        r = gguf.GGUFReader(str(path))
        arch = self._field(r, "general.architecture")
        if arch != "llama":
            raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")

        def kv(key, default=None):
            v = self._field(r, f"llama.{key}")
            return default if v is None else v

        self.n_layer = int(kv("block_count"))
        self.n_embd = int(kv("embedding_length"))
        self.n_head = int(kv("attention.head_count"))
        self.n_head_kv = int(kv("attention.head_count_kv", self.n_head))
        self.head_dim = int(kv("attention.key_length", self.n_embd // self.n_head))
        self.n_rot = int(kv("rope.dimension_count", self.head_dim))
        # llama.cpp's defaults when the key is absent
        self.rms_eps = float(kv("attention.layer_norm_rms_epsilon", 1e-5))
        self.freq_base = float(kv("rope.freq_base", 10000.0))
        if self.n_rot != self.head_dim:
            raise ValueError("llama arch requires rope.dimension_count == head_dim")
        if self._field(r, "llama.rope.scaling.type") not in (None, "none"):
            raise NotImplementedError("rope scaling is not modelled")

        t = {x.name: x for x in r.tensors}
        plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        for x in r.tensors:
            # quantized tensors come back as raw bytes; refuse rather than misread
            if x.tensor_type not in (*plain, gguf.GGMLQuantizationType.Q4_0):
                raise NotImplementedError(f"{x.name}: tensor type {x.tensor_type.name} not supported")

        def mat(name):  # gguf [n_out, n_in] -> [n_in, n_out]
            x = t[name]
            data = x.data if x.tensor_type in plain else gguf.quants.dequantize(x.data, x.tensor_type)
            return np.asarray(data, dtype=np.float64).T.copy()

        def vec(name):
            return np.asarray(t[name].data, dtype=np.float64).reshape(-1).copy()

        self.tok_embd = np.asarray(t["token_embd.weight"].data, dtype=np.float64).copy()
        self.n_vocab = self.tok_embd.shape[0]
        self.layers = []
        for il in range(self.n_layer):
            p = f"blk.{il}."
            L = _Layer()
            L.attn_norm = vec(p + "attn_norm.weight")
            L.wq = mat(p + "attn_q.weight")  # [n_embd, n_head*hd]
            L.wk = mat(p + "attn_k.weight")  # [n_embd, n_head_kv*hd]
            L.wv = mat(p + "attn_v.weight")
            L.wo = mat(p + "attn_output.weight")  # [n_head*hd, n_embd]
            L.ffn_norm = vec(p + "ffn_norm.weight")
            L.w_gate = mat(p + "ffn_gate.weight")  # [n_embd, n_ff]
            L.w_up = mat(p + "ffn_up.weight")
            L.w_down = mat(p + "ffn_down.weight")  # [n_ff, n_embd]
            for opt in ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"):
                if p + opt in t:
                    raise NotImplementedError(f"bias tensor {p + opt} not modelled")
            self.layers.append(L)
        self.output_norm = vec("output_norm.weight")
        # llama.cpp falls back to the tied embedding when output.weight is absent
        self.w_out = mat("output.weight") if "output.weight" in t else self.tok_embd.T.copy()

    @staticmethod
    def _field(reader, key):
        f = reader.get_field(key)
        if f is None:
            return None
        return f.contents()

    # ---- building blocks -------------------------------------------------

    def w_o(self, il: int) -> np.ndarray:
        """W_O of layer il, [n_head*head_dim, n_embd]: attn_out = concat_heads(o) @ W_O."""
        return self.layers[il].wo

    def _rms_norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.rms_eps) * w

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """LLAMA_ROPE_TYPE_NORM on x [n_tokens, n_heads, head_dim]."""
        d = self.n_rot
        inv_freq = self.freq_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
        ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0:d:2], x[..., 1:d:2]
        out = x.copy()
        out[..., 0:d:2] = x0 * cos - x1 * sin
        out[..., 1:d:2] = x0 * sin + x1 * cos
        return out

    def _cache_round(self, x):
        if self.kv_cache_dtype == "f16":
            return x.astype(np.float16).astype(np.float64)
        if self.kv_cache_dtype == "f32":
            return x.astype(np.float32).astype(np.float64)
        if self.kv_cache_dtype == "q8_0":
            # llama.cpp stores a quantized K/V of head_dim % 64 == 0 rotated by a 64-wide Walsh-Hadamard matrix H
            # (H·H = I), and rotates Q and the attention output to match: the model sees quant(x H) H
            rot = self.head_dim % 64 == 0
            if rot:
                x = hadamard64(x)
            # blocks of 32: scale d = amax / 127 stored as f16, values round(x / d)
            b = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
            d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
            q = np.round(b / np.where(d == 0, 1, d))
            x = (q * d.astype(np.float16).astype(np.float64)).reshape(x.shape)
            if rot:
                x = hadamard64(x)
        return x

    def qkv(self, il: int, h: np.ndarray, positions: np.ndarray):
        """Post-RoPE q [n, n_head, hd] and cache-ready k, v [n, n_head_kv, hd]."""
        L, n = self.layers[il], h.shape[0]
        x = self._rms_norm(h, L.attn_norm)
        q = (x @ L.wq).reshape(n, self.n_head, self.head_dim)
        k = (x @ L.wk).reshape(n, self.n_head_kv, self.head_dim)
        v = (x @ L.wv).reshape(n, self.n_head_kv, self.head_dim)
        q, k = self.rope(q, positions), self.rope(k, positions)
        return q, self._cache_round(k), self._cache_round(v)

    def attend(self, q, q_pos, k, v, k_pos, allowed=None):
        """Grouped-query attention of queries against a set of cache cells.

        q [nq, n_head, hd]; k, v [nk, n_head_kv, hd]; allowed: bool,
        broadcastable to [nq, n_head_kv, nk] (None = all cells).  Like
        llama.cpp's KV-cache mask, causality is by *position*: a cell is
        visible iff its pos <= the query's pos.  Returns [nq, n_head, hd].
        """
        g = self.n_head // self.n_head_kv  # query heads per KV head (llama.cpp: h // g)
        shape = (q.shape[0], self.n_head_kv, k.shape[0])
        mask = np.asarray(k_pos)[None, None, :] <= np.asarray(q_pos)[:, None, None]
        mask = np.broadcast_to(mask, shape)
        if allowed is not None:
            mask = mask & np.broadcast_to(allowed, shape)
        mask = np.repeat(mask, g, axis=1)  # [nq, n_head, nk]
        kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
        s = np.einsum("qhd,khd->qhk", q, kk) / np.sqrt(self.head_dim)
        s = np.where(mask, s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        if not np.all(np.isfinite(m)):
            raise ValueError("a query has no visible cache cell")
        p = np.exp(s - m)
        p /= p.sum(axis=-1, keepdims=True)
        return np.einsum("qhk,khd->qhd", p, vv)

    def _post_attn(self, il, h, heads):
        L, n = self.layers[il], h.shape[0]
        attn_out = heads.reshape(n, -1) @ L.wo
        h2 = h + attn_out
        x = self._rms_norm(h2, L.ffn_norm)
        a = x @ L.w_gate
        ffn = ((a / (1.0 + np.exp(-a))) * (x @ L.w_up)) @ L.w_down  # SwiGLU
        return attn_out, h2 + ffn

    def logits_from_hidden(self, h: np.ndarray) -> np.ndarray:
        return self._rms_norm(h, self.output_norm) @ self.w_out

    # ---- full-sequence API --------------------------------------------------

    def trace(self, tokens: Sequence[int], positions=None) -> Trace:
        """Forward a fresh sequence with full causal attention, keeping per-layer Q/K/V."""
        tokens = np.asarray(tokens, dtype=np.int64)
        pos = np.arange(len(tokens)) if positions is None else np.asarray(positions, dtype=np.int64)
        h = self.tok_embd[tokens]
        layers = []
        for il in range(self.n_layer):
            q, k, v = self.qkv(il, h, pos)
            heads = self.attend(q, pos, k, v, pos)
            attn_out, h_next = self._post_attn(il, h, heads)
            layers.append(LayerTrace(q, k, v, heads, attn_out, h, h_next))
            h = h_next
        return Trace(pos, layers, self.logits_from_hidden(h))

    def forward(self, tokens: Sequence[int], positions=None) -> np.ndarray:
        """Logits [n_tokens, n_vocab] for a fresh sequence."""
        return self.trace(tokens, positions).logits

    # ---- simulated KV cache with eviction ----------------------------------

    def _keep_mask(self, keep, n_prefix):
        if keep is None:
            keep = np.ones(n_prefix, dtype=bool)
        keep = np.asarray(keep, dtype=bool)
        if keep.shape[-1] != n_prefix:
            raise ValueError(f"keep mask last dim {keep.shape[-1]} != prefix length {n_prefix}")
        # [n_prefix] -> all layers/heads; [n_head_kv, n_prefix] -> all layers
        return np.broadcast_to(keep, (self.n_layer, self.n_head_kv, n_prefix))

    def decode_with_cache(
        self,
        prefix_tokens: Sequence[int],
        keep=None,
        new_tokens: Sequence[int] = (),
        prefix_positions=None,
        new_positions=None,
        key_positions=None,
        return_trace: bool = False,
    ):
        """Logits [len(new_tokens), n_vocab] after evicting prefix cells.

        Simulates: decode ``prefix_tokens`` normally (full causal attention, so
        their K/V are those of an uncompressed run), drop the cache cells where
        ``keep`` is False, then decode ``new_tokens`` (one by one or as one
        batch: identical), each attending to the kept prefix cells, earlier new
        tokens and itself.

        ``keep``: bool of shape [n_prefix], [n_head_kv, n_prefix] or
        [n_layer, n_head_kv, n_prefix] (head-wise eviction).  New tokens'
        positions default to len(prefix) + i, which is what llama.cpp does when
        decoding continues at n_past after cells were removed.

        ``key_positions`` [n_layer, n_head_kv, n_prefix]: the position each
        head's K of each prefix token is turned to (RoPE is relative, so this is
        where the new queries see it), as renumbering each head's rows does; the
        prefix then lies before every new token.
        """
        prefix = self.trace(prefix_tokens, prefix_positions)
        n_prefix = len(prefix.positions)
        keep = self._keep_mask(keep, n_prefix)
        new_tokens = np.asarray(new_tokens, dtype=np.int64)
        n_new = len(new_tokens)
        if new_positions is None:
            new_positions = n_prefix + np.arange(n_new)
        new_pos = np.asarray(new_positions, dtype=np.int64)
        h = self.tok_embd[new_tokens]
        layers = []
        for il in range(self.n_layer):
            pl = prefix.layers[il]
            q, k, v = self.qkv(il, h, new_pos)
            pk, ppos = pl.k, prefix.positions
            if key_positions is not None:
                turn = np.asarray(key_positions[il]) - prefix.positions[None, :]  # [n_head_kv, n_prefix]
                pk = np.stack([self.rope(pl.k[:, g : g + 1], turn[g])[:, 0] for g in range(self.n_head_kv)], axis=1)
                ppos = np.full(n_prefix, -1)
            kk = np.concatenate([pk, k])
            vv = np.concatenate([pl.v, v])
            kpos = np.concatenate([ppos, new_pos])
            allowed = np.concatenate(
                [np.broadcast_to(keep[il][None], (n_new, self.n_head_kv, n_prefix)),
                 np.ones((n_new, self.n_head_kv, n_new), dtype=bool)],
                axis=-1,
            )
            heads = self.attend(q, new_pos, kk, vv, kpos, allowed)
            attn_out, h_next = self._post_attn(il, h, heads)
            layers.append(LayerTrace(q, k, v, heads, attn_out, h, h_next))
            h = h_next
        logits = self.logits_from_hidden(h)
        if return_trace:
            return logits, prefix, Trace(new_pos, layers, logits)
        return logits

    def next_logits_with_mask(self, tokens: Sequence[int], positions=None, keep=None) -> np.ndarray:
        """Logits [n_vocab] of the LAST token after evicting earlier cells.

        tokens[:-1] form the cache (decoded with full attention), ``keep``
        masks them (length n-1, or n with the last entry ignored; or the
        head-wise shapes accepted by `decode_with_cache`), and tokens[-1] is
        decoded at positions[-1] (default n-1).
        """
        tokens = list(tokens)
        n = len(tokens)
        pos = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
        if keep is not None:
            keep = np.asarray(keep, dtype=bool)
            if keep.shape[-1] == n:
                keep = keep[..., : n - 1]
        return self.decode_with_cache(
            tokens[:-1], keep, tokens[-1:], prefix_positions=pos[:-1], new_positions=pos[-1:]
        )[0]
