"""The patch applies cleanly (no offset, no fuzz) to the pinned llama.cpp, and the built library exports every
function the patch declares in llama.h and native/llama-kv-evict-debug.h declares beside it. For another version: scripts/try_patch_upgrade.py VERSION."""

from __future__ import annotations

import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from pyllmkv import _lib

ROOT = Path(__file__).resolve().parent.parent
PATCHES = sorted((ROOT / "patches").glob("*.patch"))


@pytest.fixture(scope="module")
def pristine_tree(tmp_path_factory) -> Path:
    sdists = sorted((ROOT / "build" / "download").glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        pytest.skip("the pinned source distribution is not in build/download: run `pip install .` first")
    work = tmp_path_factory.mktemp("pristine")
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(work, members=[m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name], filter="data")
    return next(work.glob("*/vendor/llama.cpp"))


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_applies_cleanly_to_the_pinned_source(pristine_tree, patch):
    out = subprocess.run(["patch", "-p1", "--dry-run", "-i", str(patch)], cwd=pristine_tree, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not re.search(r"offset|fuzz|FAILED", out.stdout + out.stderr), out.stdout


def test_library_exports_every_function_the_patch_declares():
    declared = set()
    for patch in PATCHES:
        declared |= set(re.findall(r"^\+\s*LLAMA_API\b[^(]*?\b(llama_kv_evict\w*)\s*\(", patch.read_text(), re.M))
    assert len(declared) >= 10, declared
    # the debug entry points, declared in native/ rather than llama.h
    debug = set(re.findall(r"^\s*LLAMA_API\b[^(]*?\b(llama_kv_evict\w*)\s*\(",
                           (ROOT / "native" / "llama-kv-evict-debug.h").read_text(), re.M))
    assert len(debug) == 5 and not debug & declared, debug
    declared |= debug
    lib = next(p for p in _lib.lib_dir().glob("libllama.*") if p.suffix in (".so", ".dylib") or ".so." in p.name)
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    exported = set(re.findall(r"\b(llama_kv_evict\w*)\b", symbols))
    assert declared <= exported, f"declared but not exported: {sorted(declared - exported)}"
