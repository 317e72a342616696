"""llama.cpp's own server (llama-server of the pinned source) on the patched library, for several conversations at once.

Each of its --parallel slots is a sequence of one context with a stream of cells of its own; before every decode the
server's hook (patches/0002, native/server/) evicts each slot that the batch would take past its cells, so every
conversation keeps its own budget while the slots decode together in one batch (llama-server's continuous batching).
The server is built on first use in the build tree that built the library (server-build.json beside it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from . import _lib
from ._lib import EvictConfig

BINARY = "llama-server"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def binary(say: Callable[[str], None] = _say) -> Path:
    """llama-server beside the patched library, built there on first use (a few minutes on 2 cores)."""
    spec_path = _lib.lib_dir() / "server-build.json"
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path} is missing, so llama-server cannot be built as the library was: "
                                "reinstall pyllmkv from its source (pip install .)")
    build_dir = Path(json.loads(spec_path.read_text())["build_dir"])
    built = build_dir / "bin" / BINARY
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        raise FileNotFoundError(f"the build tree that built pyllmkv's library ({build_dir}) is gone, and llama-server is "
                                "built there: reinstall pyllmkv from its source checkout (pip install .), which keeps it")
    t0 = time.time()
    if not built.exists():
        say(f"pyllmkv: building llama.cpp's llama-server (patched) once, in {build_dir}; several minutes on 2 cores")
    log = build_dir / "llama-server-build.log"
    with open(log, "w") as out:
        def run(cmd: List[str]) -> None:
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"building llama-server failed: see {log}")

        cmake = re.search(r"^CMAKE_COMMAND:INTERNAL=(.*)$", cache.read_text(), re.M).group(1)
        if not Path(cmake).exists():
            # pip built the library with the CMake of its isolated environment, gone since: the build rules call it,
            # so this one writes them again
            cmake = shutil.which("cmake")
            if not cmake:
                raise FileNotFoundError("building llama-server needs CMake: pip install cmake")
            run([cmake, str(build_dir)])
        # cheap when up to date; after a patch or native/server change it rebuilds only what changed
        run([cmake, "--build", str(build_dir), "--target", BINARY, "-j", str(os.cpu_count() or 1)])
    if time.time() - t0 > 10:
        say(f"pyllmkv: llama-server built in {time.time() - t0:.0f} s ({built})")
    return built


def evict_spec(config: EvictConfig) -> str:
    """LLAMA_KV_EVICT's value for config: the fields of llama_kv_evict_params, as the server's hook parses them."""
    fields = ("policy", "granularity", "budget", "window", "pool_kernel", "first_stage_ratio", "epsilon", "n_sink",
              "ada_alpha")
    return " ".join(f"{name}={getattr(config, name)}" for name in fields)


def command(model: str, config: Optional[EvictConfig], n_parallel: int, n_batch: int, host: str, port: int,
            extra: List[str] = (), server: Optional[Path] = None) -> Tuple[List[str], dict]:
    """The argv and environment of a llama-server serving model with n_parallel slots, each within config's cells
    (None: stock llama-server, the full cache of -c in `extra`). `extra`: more llama-server flags (-t, -ngl, -fa ...)."""
    argv = [str(server or binary()), "-m", model, "-np", str(n_parallel), "-b", str(n_batch), "-ub", str(n_batch),
            "--host", host, "--port", str(port), "--no-webui", "--metrics", *extra]
    env = dict(os.environ)
    env.pop("LLAMA_KV_EVICT", None)
    if config is not None:
        env["LLAMA_KV_EVICT"] = evict_spec(config)
    return argv, env
