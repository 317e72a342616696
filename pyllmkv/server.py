"""llama-cpp-python's OpenAI-compatible server (llama_cpp.server) on a pyllmkv.Llama."""

from __future__ import annotations

import functools
import socket
import types
from typing import Optional

from ._lib import EvictConfig, llama_cpp
from .llama import Llama


class _ModelModule(types.ModuleType):
    """Stands in for the `llama_cpp` module inside llama_cpp.server.model, so that the server's own model loading
    (every setting it maps) builds a pyllmkv.Llama instead of a llama_cpp.Llama."""

    def __init__(self, **evict_kwargs):
        super().__init__("llama_cpp")
        self.Llama = functools.partial(Llama, **evict_kwargs)

    def __getattr__(self, name):
        return getattr(llama_cpp, name)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def create_app(model_path: str, kv_budget: int, policy: str, window: int, n_ctx: int, n_batch: int, prompt_tail: bool = True,
               pool_kernel: int = EvictConfig.pool_kernel, granularity: str = EvictConfig.granularity,
               renumber: Optional[bool] = None, repack: bool = False, **settings):
    """The FastAPI app of llama_cpp.server serving model_path with a budgeted cache (pyllmkv.Llama's arguments)."""
    try:
        from llama_cpp.server import app as server_app
        from llama_cpp.server import model as server_model
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise RuntimeError(
            f"the server needs llama-cpp-python's server extras ({e.name} is missing): pip install 'llama-cpp-python[server]==0.3.36'"
        ) from e

    server_model.llama_cpp = _ModelModule(kv_budget=kv_budget, policy=policy, granularity=granularity, window=window,
                                          pool_kernel=pool_kernel, prompt_tail=prompt_tail, renumber=renumber,
                                          repack=repack)
    model_settings = ModelSettings(model=model_path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, verbose=False, **settings)
    return server_app.create_app(server_settings=ServerSettings(), model_settings=[model_settings])
