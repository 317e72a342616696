"""Stock llama.cpp for the bench, built on first use (pyllmkv/bench/stock.py): from the pinned source with the patched
build's options; a failed build leaves nothing that looks built. That the library it builds is llama.cpp unpatched,
and gives the patched one's logits where nothing is evicted, is test_bench's test_stock_is_llama_cpp_unpatched..."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from pyllmkv import _lib
from pyllmkv.bench import stock


def test_the_spec_is_the_pinned_source_with_the_patched_builds_options():
    import llama_cpp

    spec = stock.build_spec()
    assert spec["llama_cpp_python"] == llama_cpp.__version__
    assert Path(spec["sdist"]).name == f"llama_cpp_python-{llama_cpp.__version__}.tar.gz"
    args = spec["cmake_args"]
    assert "-DBUILD_SHARED_LIBS=ON" in args and any(a.startswith("-DGGML_") for a in args)
    assert any(a.startswith("-DCMAKE_INSTALL_RPATH=") for a in args)


def test_the_stock_library_has_no_hook():
    lib = next(p for p in sorted(stock.lib_dir().glob("libllama.*")) if p.suffix in (".so", ".dylib", ".dll"))
    assert Path(lib).parent.resolve() != _lib.lib_dir().resolve()
    stock_llama = ctypes.CDLL(str(lib))
    assert hasattr(stock_llama, "llama_decode") and not hasattr(stock_llama, "llama_kv_evict_enable")


def test_a_failed_build_names_its_log_and_leaves_no_library(tmp_path, monkeypatch):
    spec = dict(stock.build_spec())
    spec["cmake_args"] = spec["cmake_args"] + ["-DCMAKE_C_COMPILER=/nonexistent/cc"]
    if not Path(spec["sdist"]).exists():
        pytest.skip("the source distribution is not where the install left it (a package built elsewhere)")
    target = tmp_path / "stock-x"
    with pytest.raises(RuntimeError, match=r"building stock llama.cpp failed at .*see .*stock-x\.log"):
        stock.build(spec, target, say=lambda msg: None)
    assert not target.exists() and (tmp_path / "stock-x.log").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".stock-x-")] == []  # the work folder is gone
