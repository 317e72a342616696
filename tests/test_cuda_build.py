"""The CUDA side of the hook builds without a GPU: the kernels (native/cuda/*.cu) compile with this machine's nvcc for
the architectures ggml-cuda targets, and the host code that dispatches to them compiles with PYLLMKV_CUDA defined.
Running them needs a GPU: scripts/gpu-check (tests/test_gpu.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["75", "80", "86", "89", "90"]


def _nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip("no nvcc on this machine: the CUDA kernels are not compiled here")


@pytest.mark.parametrize("source", sorted((ROOT / "native" / "cuda").glob("*.cu")), ids=lambda p: p.name)
def test_cuda_kernels_compile_for_every_architecture(source, tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    out = subprocess.run([_nvcc(), "-c", "-O3", "-std=c++17", *gencode, str(source), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = subprocess.run(["cuobjdump", "--list-elf", str(tmp_path / "k.o")], capture_output=True, text=True) \
        if shutil.which("cuobjdump") else None
    if listed is not None and listed.returncode == 0:
        for a in ARCHS:
            assert f"sm_{a}" in listed.stdout


def test_host_dispatch_compiles_with_cuda_enabled():
    trees = sorted((ROOT / "build" / "download").glob("llama.cpp-*"))
    if not trees:
        pytest.skip("no patched llama.cpp tree in build/download: run `pip install .` first")
    tree = trees[-1]
    cxx = shutil.which("c++") or shutil.which("g++")
    includes = [ROOT / "native", tree / "include", tree / "src", tree / "ggml" / "include"]
    sources = [p for p in sorted((ROOT / "native").glob("*.cpp")) if "PYLLMKV_CUDA" in p.read_text()]
    assert sources, "no native source dispatches to CUDA"
    for source in sources:
        out = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-DPYLLMKV_CUDA", *[f"-I{p}" for p in includes],
                              str(source)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
