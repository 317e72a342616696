"""llama-cpp-python's own tests, with pyllmkv.Llama as llama_cpp.Llama: the drop-in claim checked by its suite.

The tests come from the source distribution the build downloads (build/download/, or $PYLLMKV_DOWNLOAD_DIR), of the
installed llama-cpp-python's version, and run in a child pytest with tests/upstream_peer.py as plugin: once with a
budget nothing reaches, once with one that every decoding test outgrows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import pyllmkv
from tinymodel import write_tiny_llama, write_tiny_mamba

TESTS_DIR = Path(__file__).resolve().parent
VERSION = pyllmkv.llama_cpp.__version__
ARCHIVE = (Path(os.environ.get("PYLLMKV_DOWNLOAD_DIR") or TESTS_DIR.parent / "build" / "download")
           / f"llama_cpp_python-{VERSION}.tar.gz")
VOCAB = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"  # test_llama.py's MODEL, relative to the archive's root

QWEN35 = "Qwen3.5-0.8B (a hybrid model: not here offline, and pyllmkv.Llama refuses it)"
HYBRID = "needs a hybrid model (Falcon-H1-Tiny): not here offline, and pyllmkv.Llama refuses it as a recurrent one"
NOT_APPLICABLE = {
    "tests/test_llama.py::test_real_model": f"asserts the token ids of {QWEN35}; drives llama_cpp._internals, not "
                                            "Llama",
    "tests/test_llama.py::test_real_llama": f"asserts the exact completions of {QWEN35}",
    "tests/test_llama.py::test_real_llama_repeated_prompt_cache": f"asserts the exact completion of {QWEN35}",
    "tests/test_llama.py::test_real_llama_embeddings": "needs an embedding model (bge-small: BERT, mean pooling), "
                                                       "not here offline; SmolLM2 in its place fails under "
                                                       "llama_cpp.Llama too",
    "tests/test_llama.py::test_hybrid_model_prompt_cache_reset": HYBRID,
    **{f"tests/test_llama.py::{name}[llama_cpp_hybrid_model_path-False-True]": HYBRID for name in (
        "test_exact_cached_prompt_reuse_matches_fresh", "test_loaded_exact_cached_prompt_reuse_matches_fresh",
        "test_ram_cache_exact_prompt_hit_matches_fresh", "test_shorter_prompt_prefix_reuse_matches_fresh")},
}
# run on the tiny mamba, and must fail with the KVEvictError that names llama_cpp.Llama (as README says)
RECURRENT = "pyllmkv.Llama refuses a recurrent model: its state is not a KV cache the hook can evict"
REFUSED = {
    "tests/test_llama.py::test_recurrent_model_prompt_cache_reset": RECURRENT,
    **{f"tests/test_llama.py::{name}[llama_cpp_recurrent_model_path-True-False]": RECURRENT for name in (
        "test_exact_cached_prompt_reuse_matches_fresh", "test_loaded_exact_cached_prompt_reuse_matches_fresh",
        "test_ram_cache_exact_prompt_hit_matches_fresh", "test_shorter_prompt_prefix_reuse_matches_fresh")},
}

# under eviction a prefix's kept cells are chosen with what came after it, and each row is computed over the cells
# kept when its batch ran: reused from a longer history, a prefix is not the prefix decoded alone
LOSSY = {
    "tests/test_llama.py::test_shorter_prompt_prefix_reuse_matches_fresh[llama_cpp_transformer_model_path-False-False]":
        "compares a prefix of a longer evaluated history with a fresh decode of it: an evicted cache is not exact",
}

# One thread: a tiny model gains nothing from two, and ggml's spinning threads crawl on a busy machine.
# The smallest budget the default policy takes is window + 2 x 4 sink cells (each head keeps (kv_budget + window) / 2
# on average, the sinks among them); the tiny llama's byte tokenizer makes the tests' prompt ("The quick brown fox",
# 20 tokens) outgrow it, where SmolLM2's 4 tokens would not.
MODES = {  # mode -> (Llama arguments, tests not applicable in that mode)
    "no-eviction": ({"kv_budget": 1024, "n_threads": 1, "n_threads_batch": 1}, {}),
    "evicting": ({"kv_budget": 10, "window": 2, "n_batch": 3, "n_ubatch": 3, "n_threads": 1, "n_threads_batch": 1},
                 LOSSY),
}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """The archive's tests/ and test_llama.py's vocabulary model, extracted; returns the extracted root."""
    if not ARCHIVE.exists():
        pytest.skip(f"no {ARCHIVE}: the build downloads it (CMakeLists.txt); else set PYLLMKV_DOWNLOAD_DIR")
    out = tmp_path_factory.mktemp("upstream")
    prefix = f"llama_cpp_python-{VERSION}/"
    with tarfile.open(ARCHIVE) as tar:
        members = [m for m in tar if m.name.startswith(prefix + "tests/") or m.name == prefix + VOCAB]
        tar.extractall(out, members=members, filter="data")
    root = out / prefix
    (root / "pytest.ini").write_text("[pytest]\n")  # keeps pyllmkv's pytest options out of the child
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """The upstream fixtures' hub files -> local stand-ins: stories15M is a tiny llama, as ours; mamba-130m a mamba."""
    d = tmp_path_factory.mktemp("models")
    return {
        "ggml-org/models/tinyllamas/stories15M-q4_0.gguf": write_tiny_llama(d / "tiny.gguf"),
        "QuantFactory/mamba-130m-hf-GGUF/mamba-130m-hf.Q2_K.gguf": write_tiny_mamba(d / "mamba.gguf"),
    }


@pytest.mark.parametrize("mode", MODES)
def test_upstream_suite(mode, upstream, models, tmp_path):
    report = tmp_path / "report.json"
    llama, lossy = MODES[mode]
    peer = {"llama": llama, "models": models, "deselect": {**NOT_APPLICABLE, **lossy}, "refused": REFUSED,
            "report": str(report)}
    env = {**os.environ, "PYLLMKV_PEER": json.dumps(peer),
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "upstream_peer", "-q", "-rfEsxX", "tests"],
                          cwd=upstream, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    results = json.loads(report.read_text())
    outcomes = {test: r["outcome"] for test, r in results.items()}
    assert outcomes == {test: "xfailed" if test in REFUSED else "passed" for test in outcomes}, proc.stdout[-3000:]
    decoded = {test: r["evicted"] for test, r in results.items() if r["decoded"]}
    assert decoded.keys() == {test for test in outcomes if "[llama_cpp_transformer_model_path" in test}
    if mode == "evicting":
        assert all(decoded.values()), decoded
    else:
        assert not any(decoded.values()), decoded
