"""Past one machine: a model's layers, and their KV cache, on other hosts through ggml's RPC backend, as llama.cpp's
`--rpc HOST:PORT,...` places them. Each host runs `pyllmkv rpc-server` (ggml's ggml-rpc-server, built beside the
libraries); the servers are registered as devices before the model loads, and `-ngl` layers are split across them. The
hook's scoring and compaction are ggml graphs on the cache's backends, so they run where the cache lives; the fused
CPU kernels read host memory and step aside (`kv_stats()` names the kernel that ran: ggml-graph). Loading this file
loads no libllama: bench's stock worker loads it by path and registers the servers with the unpatched library."""

from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path
from typing import Iterable, Optional, Union

_registered: list[str] = []  # endpoints registered in this process: ggml keeps them until it exits
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


def server_path() -> Path:
    """ggml-rpc-server of this build."""
    from . import _lib

    path = _lib.lib_dir() / "ggml-rpc-server"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this build has no RPC backend; rebuild with "
                                "CMAKE_ARGS=\"... -DGGML_RPC=ON\" pip install .")
    return path


def endpoints(servers: Union[str, Iterable[str]]) -> list[str]:
    """HOST:PORT strings from "a:1,b:2" or a list, each checked to be one."""
    items = [s.strip() for s in (servers.split(",") if isinstance(servers, str) else servers) if s.strip()]
    if not items:
        raise ValueError("no RPC servers given: pass HOST:PORT[,HOST:PORT...]")
    for item in items:
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"RPC server {item!r} is not HOST:PORT (e.g. 192.168.1.2:50052)")
    return items


def _reachable(endpoint: str, timeout: float = 5.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach the RPC server {endpoint} ({e.strerror or e}): start `pyllmkv rpc-server "
                              f"-H HOST -p {port}` on that host (ggml's server binds 127.0.0.1 unless told -H)") from None


def _on_abort(message: bytes) -> None:
    # ggml aborts the process when a server stops answering mid-run; say which way out there is before it does. To the
    # stderr of registration time: llama-cpp-python points fd 2 at /dev/null while it loads a model quietly
    os.write(_stderr_fd, (f"pyllmkv: {message.decode(errors='replace').strip()}. The layers on the RPC servers "
                          f"({', '.join(_registered)}) are lost with it: restart the server and load the model again.\n").encode())


_abort_callback = _ABORT_CALLBACK(_on_abort)  # kept alive for ggml
_stderr_fd = None


def _registry(lib: ctypes.CDLL):
    """ggml's backend registry, resolved through a libllama's dependencies (its libggml): the patched one, or in bench's
    stock worker the unpatched one, which must not see pyllmkv's."""
    fns = []
    for name, argtypes, restype in (("ggml_backend_reg_by_name", [ctypes.c_char_p], ctypes.c_void_p),
                                    ("ggml_backend_reg_get_proc_address", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
                                    ("ggml_backend_register", [ctypes.c_void_p], None),
                                    ("ggml_set_abort_callback", [_ABORT_CALLBACK], _ABORT_CALLBACK)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
        fns.append(fn)
    return fns


def add_servers(servers: Union[str, Iterable[str]], lib: Optional[ctypes.CDLL] = None) -> list[str]:
    """Registers RPC servers as ggml devices, as llama.cpp's --rpc does, after checking that each answers (ggml itself
    aborts the process on a server it cannot reach). Models loaded afterwards in this process split their -ngl layers
    across them. Returns the endpoints registered now (one registered before is not registered twice). `lib`: the
    libllama to register them with [default: pyllmkv's]."""
    if lib is None:
        from . import _lib

        lib = _lib._lib
    reg_by_name, reg_get_proc_address, register, set_abort_callback = _registry(lib)
    items = endpoints(servers)
    reg = reg_by_name(b"RPC")
    if not reg:
        raise RuntimeError("this build has no RPC backend: rebuild with CMAKE_ARGS=\"... -DGGML_RPC=ON\" pip install .")
    add = _ADD_SERVER(reg_get_proc_address(reg, b"ggml_backend_rpc_add_server"))
    new = [e for e in items if e not in _registered]
    for endpoint in new:
        _reachable(endpoint)
    for endpoint in new:
        register(add(endpoint.encode()))
        _registered.append(endpoint)
    global _stderr_fd
    if _stderr_fd is None:
        _stderr_fd = os.dup(2)
    set_abort_callback(_abort_callback)
    return new
