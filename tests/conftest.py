"""Shared fixtures: llama_cpp bound to pyllmkv's patched library, the tiny random model, and the real test models."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # the soak and bench helpers

import pyllmkv  # noqa: E402  (binds llama_cpp to the patched libllama before anything imports llama_cpp)
from pyllmkv import models  # noqa: E402
from tinymodel import write_tiny_llama  # noqa: E402
from llama_server import free_port  # noqa: E402,F401  (the tests' free ports, one helper with the scripts')


@pytest.fixture(scope="session")
def llama_cpp():
    return pyllmkv.llama_cpp


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)


@pytest.fixture(scope="session")
def tiny64_path(tmp_path_factory) -> str:
    # head_dim 64, as real models: a head's slice of a q4_0/q5_0/q8_0 row is whole blocks of whole 4-byte words
    return write_tiny_llama(tmp_path_factory.mktemp("tiny64") / "tiny64.gguf", seed=3, head_dim=64)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return str(models.smollm2())


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    return str(models.gemma3_270m())


# `python -m pyllmkv` from outside the checkout, so the installed package (with its library) is the one imported
SUBPROCESS_CWD = tempfile.gettempdir()


def held_positions(llm, ref, n_cells: int | None = None) -> np.ndarray:
    """[n_layer, n_kv, cells]: the position of the token whose row each head holds in each of the sequence's first
    n_cells cells (all by default), -1 where an -ada head holds none."""
    from pyllmkv import debug

    return np.stack([debug.head_positions(llm, il, ref.n_head_kv)[:, :n_cells] for il in range(ref.n_layer)])


def keep_from_held(held: np.ndarray, n_prefix: int) -> np.ndarray:
    """The numpy oracle's per-head keep mask [n_layer, n_kv, n_prefix] of the tokens the heads hold."""
    keep = np.zeros(held.shape[:2] + (n_prefix,), dtype=bool)
    for il in range(held.shape[0]):
        for g in range(held.shape[1]):
            keep[il, g, held[il, g][held[il, g] >= 0]] = True
    return keep


def random_tokens(n: int, seed: int = 1, n_vocab: int = 256, low: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(low, n_vocab, n)]
