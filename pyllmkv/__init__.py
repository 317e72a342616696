"""pyllmkv: llama.cpp's KV cache with a fixed budget, evicting the cells whose loss perturbs the output least."""

from ._lib import DEFAULT_POLICY, EvictConfig, KVEvictError, POLICIES, default_config, llama_cpp
from .llama import Llama

__all__ = ["DEFAULT_POLICY", "EvictConfig", "KVEvictError", "Llama", "POLICIES", "default_config", "llama_cpp"]
__version__ = "0.1.0"
