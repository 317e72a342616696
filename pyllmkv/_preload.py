"""What is loaded before any libllama, patched or stock. Imports nothing of pyllmkv: bench's worker loads this file by
path before the stock libllama (importing pyllmkv would load the patched one)."""

from __future__ import annotations

import ctypes
import ctypes.util


def libstdcxx_global() -> None:
    """A CUDA build's libggml-cuda exports copies of libstdc++'s template instances; libllama, loaded by ctypes in a
    scope of its own, binds to those before libstdc++ and crashes in them (seen with CUDA 13, GCC 13). With libstdc++
    global first, every library binds to it, as in a program linked against it."""
    stdcpp = ctypes.util.find_library("stdc++")
    if stdcpp:
        ctypes.CDLL(stdcpp, mode=ctypes.RTLD_GLOBAL)
