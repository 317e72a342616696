"""Stock llama.cpp for `pyllmkv bench` to compare against: the same pinned source, unpatched, built with the patched
build's ggml options and compilers (stock-build.json, written by CMakeLists.txt beside the libraries). Install builds
only the patched library, which is all a chat needs; bench builds this one the first time it needs it, into the user
cache, once per source and options."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

from .. import _lib
from ..models import cache_dir

try:
    import fcntl
except ImportError:  # Windows: no lock; two first uses at once would each build
    fcntl = None

INSTALLED = Path(__file__).resolve().parent.parent / "stock"  # built at install with -DPYLLMKV_STOCK=ON


def _has_llama(d: Path) -> bool:
    return any(d.glob("*llama.*"))


def lib_dir(say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The unpatched library's folder: $PYLLMKV_STOCK_LIB_DIR, else the one built at install, else the one bench
    built in the user cache, building it now if there is none (minutes; `say` tells what it does)."""
    env = os.environ.get("PYLLMKV_STOCK_LIB_DIR")
    if env:
        if not _has_llama(Path(env)):
            raise FileNotFoundError(f"stock llama.cpp is not in {env} (PYLLMKV_STOCK_LIB_DIR): point it to the lib "
                                    "folder of an unpatched build, or unset it and bench builds one")
        return Path(env)
    if _has_llama(INSTALLED):
        return INSTALLED
    spec = build_spec()
    target = cache_dir() / f"stock-{spec['llama_cpp_python']}-{_key(spec)}"
    if not _has_llama(target / "lib"):
        build(spec, target, say)
    return target / "lib"


def build_spec() -> dict:
    """What CMakeLists.txt recorded for the stock build: the llama-cpp-python version, its sdist, the CMake args."""
    path = _lib.lib_dir() / "stock-build.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing, so stock llama.cpp cannot be built as the patched one was: "
                                "reinstall pyllmkv (pip install .)")
    return json.loads(path.read_text())


def _key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec["cmake_args"]).encode()).hexdigest()[:12]


def _cmake() -> str:
    cmake = shutil.which("cmake")
    if not cmake:
        raise FileNotFoundError("building stock llama.cpp for pyllmkv bench needs CMake: pip install cmake "
                                "(\"pyllmkv[bench]\" brings it)")
    return cmake


def _sdist(spec: dict, work: Path) -> Path:
    """The source distribution: where the install left it, else downloaded from the package index."""
    sdist = Path(spec["sdist"])
    if sdist.exists():
        return sdist
    requirement = f"llama-cpp-python=={spec['llama_cpp_python']}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", str(work), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = list(work.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"could not download {requirement}'s source from the package index:\n{result.stderr.strip()}")
    return found[0]


def build(spec: dict, target: Path, say: Callable[[str], None]) -> None:
    """Builds and installs the stock libraries into target/lib; one process at a time (a lock), the folder renamed into
    place when complete, so an interrupted build leaves nothing that looks finished."""
    cmake = _cmake()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _has_llama(target / "lib"):
            return  # another process built it meanwhile
        t0 = time.time()
        say(f"pyllmkv bench: building stock llama.cpp (llama-cpp-python {spec['llama_cpp_python']}'s, unpatched, the "
            f"patched build's ggml options) once, into {target}; a few minutes on 2 cores")
        log = target.parent / f"{target.name}.log"
        with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as tmp:
            work = Path(tmp)
            with tarfile.open(_sdist(spec, work)) as tar:
                members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
                tar.extractall(work, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            (source,) = work.glob("llama_cpp_python-*/vendor/llama.cpp")
            steps = [
                [cmake, "-S", str(source), "-B", str(work / "build"), *spec["cmake_args"], f"-DCMAKE_INSTALL_PREFIX={work / 'install'}"],
                [cmake, "--build", str(work / "build"), "-j", str(os.cpu_count() or 1)],
                [cmake, "--install", str(work / "build")],
            ]
            with open(log, "w") as out:
                for cmd in steps:
                    if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                        raise RuntimeError(f"building stock llama.cpp failed at `{' '.join(cmd[:3])} ...`: see {log}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(work / "install", target)
        say(f"pyllmkv bench: stock llama.cpp built in {time.time() - t0:.0f} s ({target / 'lib'})")
