#!/usr/bin/env python3
"""Where decode time goes between stock llama.cpp and pyllmkv: the library, the weights' layout, the hook.

    python scripts/decode_ab.py [MODEL] [--context 4096] [--budget 1024] [-n 128] [--rounds 3] [-t 2]

Each config prefills the same licence text (--context tokens, batches of 512) through budget + 512 cells, then decodes
-n tokens greedily, in a fresh process; rounds interleave the configs. Prints each run and, per config, the medians
of prefill tokens/s and decode milliseconds per token:
- stock: unpatched llama.cpp (bench's build) with llama.cpp's context shift (bench's StockStream), weights repacked
  as llama.cpp loads a CPU model (CPU_REPACK);
- patched-repacked: pyllmkv's library, the same context shift and Python path, weights repacked as stock's;
- patched: the same, weights plain, as pyllmkv loads a CPU model (pyllmkv._lib.cpu_weights);
- pyllmkv: pyllmkv's Session evicting with --policy (bench's PyllmkvStream), weights plain.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pyllmkv"
CONFIGS = ("stock", "patched-repacked", "patched", "pyllmkv")
N_BATCH = 512


def by_path(name: str, path: Path):
    """A module loaded by path: importing the pyllmkv package would load the patched libllama into a stock process."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def licence_tokens(llm, n: int) -> list[int]:
    text = Path("/usr/share/common-licenses/GPL-3").read_text() + Path("/usr/share/common-licenses/Apache-2.0").read_text()
    hay = llm.tokenize(text.encode(), add_bos=False)
    return (llm.tokenize(b"", add_bos=True) + hay * (n // len(hay) + 1))[:n]


def interleave(rounds: int, children: list[tuple[list[str], dict | None]]) -> list[dict]:
    """Each child (arguments to this Python, environment or None) once per round, in turn, each a fresh process that
    prints its run as JSON on its last line; the runs in order."""
    runs = []
    for _ in range(rounds):
        for argv, env in children:
            out = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    return runs


def write_out(path: Path | None, runs: list[dict], medians) -> None:
    """The command, runs and medians as JSON, if a path was given."""
    if path:
        command = f"python scripts/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
        path.write_text(json.dumps({"command": command, "runs": runs, "medians": medians}, indent=1) + "\n")


def one_run(a, config: str) -> dict:
    worker = by_path("worker", PACKAGE / "bench" / "worker.py")
    common = dict(n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    if config == "stock":
        os.environ["LLAMA_CPP_LIB_PATH"] = a.stock_lib
        worker.package_module("_preload").libstdcxx_global()
        import llama_cpp
    else:
        sys.path.insert(0, str(PACKAGE.parent))
        import pyllmkv
        from pyllmkv import _lib

        llama_cpp = pyllmkv.llama_cpp
    layout = _lib.cpu_weights("repack-all" if config == "patched-repacked" else "plain") if config != "stock" else nullcontext()
    if config == "pyllmkv":
        from pyllmkv.session import Session

        evict = pyllmkv.EvictConfig.for_cells(a.budget, policy=a.policy)
        with layout:
            llm = llama_cpp.Llama(model_path=a.model, n_ctx=evict.cells + N_BATCH, **common)
        stream = worker.PyllmkvStream(_lib, Session(llm, evict))
    else:
        with layout:
            llm = llama_cpp.Llama(model_path=a.model, n_ctx=a.budget + N_BATCH, **common)
        stream = worker.StockStream(llama_cpp, llm, a.budget + N_BATCH, 4)
    speed = worker.time_speed(stream, licence_tokens(llm, a.context), a.n_decode)
    return {"config": config, "prefill_tps": speed["prefill_tps"], "decode_ms": speed["decode_s"] / a.n_decode * 1e3,
            "cells": stream.counters()["cells"], "peak_rss_mib": worker.peak_rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("-n", dest="n_decode", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-t", dest="threads", type=int, default=2)
    ap.add_argument("--policy", default="criticalkv")
    ap.add_argument("--stock-lib", help=argparse.SUPPRESS)
    ap.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # a child process's run
    ap.add_argument("-o", "--out", type=Path, help="also write the runs and medians to this JSON file")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_run(a, a.one)))
        return
    sys.path.insert(0, str(PACKAGE.parent))
    from pyllmkv import models
    from pyllmkv.bench import stock

    a.model = a.model or str(models.qwen25_coder_1_5b())
    args = [a.model, "--context", str(a.context), "--budget", str(a.budget), "-n", str(a.n_decode), "-t", str(a.threads),
            "--policy", a.policy, "--stock-lib", str(stock.lib_dir())]
    runs = interleave(a.rounds, [([__file__, *args, "--one", config], None) for config in CONFIGS])
    medians = {c: {k: statistics.median(r[k] for r in runs if r["config"] == c)
                   for k in ("prefill_tps", "decode_ms", "cells", "peak_rss_mib")} for c in CONFIGS}
    for c, m in medians.items():
        print(f"{c:<17} prefill {m['prefill_tps']:6.1f} tok/s  decode {m['decode_ms']:5.1f} ms/token  "
              f"cells {m['cells']:.0f}  peak RSS {m['peak_rss_mib']:.0f} MiB")
    write_out(a.out, runs, medians)


if __name__ == "__main__":
    main()
