"""One measurement of `pyllmkv bench`, in a process of its own: python worker.py JOB.json (writes JOB.json.out).

Run by path, not as `python -m pyllmkv.bench.worker`: importing the pyllmkv package loads the patched libllama, and a
stock job must load the unpatched one (LLAMA_CPP_LIB_PATH) into a process that never saw the other. A fresh process
per job also makes its peak RSS that job's own.

Jobs (the "suite" key): speed (prefill a prompt, then decode greedily), needle (prefill, then answer greedily) and
ppl (stream a text and sum the negative log-likelihood of every next token). Engines: "pyllmkv" (pyllmkv.Session with
an eviction policy and budget), "stock" (llama.cpp unpatched, the whole sequence in the cache) and "stock-shift"
(unpatched, bounded by llama.cpp's context shift).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_mib() -> float:
    """The process's peak resident set (VmHWM on Linux, ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def loaded_ggml():
    """The libggml this process loaded (through the patched or the stock libllama), or None before any."""
    import ctypes

    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/libggml.so" in line}
    if not paths:
        return None
    ggml = ctypes.CDLL(paths.pop())
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    return ggml


def device_names() -> list[str]:
    """ggml's devices in this process, as llama.cpp lists them (an RPC server is "RPC0[HOST:PORT]" or similar)."""
    ggml = loaded_ggml()
    return [ggml.ggml_backend_dev_name(ggml.ggml_backend_dev_get(i)).decode() for i in range(ggml.ggml_backend_dev_count())] if ggml else []


def gpu_memory_used_mib() -> float | None:
    """Memory in use on the process's GPUs (total - free, as ggml's devices report it; the whole device, so run one
    job at a time), or None without a GPU device."""
    import ctypes

    ggml = loaded_ggml()
    if ggml is None:
        return None
    used, gpus = 0, 0
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) != 1:  # GGML_BACKEND_DEVICE_TYPE_GPU
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        used, gpus = used + total.value - free.value, gpus + 1
    return used / 2**20 if gpus else None


class StockStream:
    """Stock llama.cpp through llama-cpp-python. With n_keep, llama.cpp's context shift as llama-cli does it: when a
    batch would not fit in n_ctx cells, the first n_keep tokens stay, the older half of the rest is dropped and the
    newer half shifted down (at least as many as the batch needs)."""

    def __init__(self, llama_cpp, llm, n_ctx: int, n_keep: int | None):
        self.llama_cpp = llama_cpp
        self.llm = llm
        self.ctx = llm._ctx.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = n_ctx  # llama.cpp may allocate more (padding): shift at what was asked for
        self.n_keep = n_keep
        self.n_past = 0
        self.n_shifts = 0
        self.batch = llama_cpp._internals.LlamaBatch(n_tokens=llm.n_batch, embd=0, n_seq_max=1, verbose=False)

    def _make_room(self, n_new: int) -> None:
        if self.n_keep is None or self.n_past + n_new <= self.n_ctx:
            return
        n_discard = max((self.n_past - self.n_keep) // 2, self.n_past + n_new - self.n_ctx)
        lc = self.llama_cpp
        lc.llama_memory_seq_rm(self.mem, 0, self.n_keep, self.n_keep + n_discard)
        lc.llama_memory_seq_add(self.mem, 0, self.n_keep + n_discard, self.n_past, -n_discard)
        self.n_past -= n_discard
        self.n_shifts += 1

    def decode(self, tokens, all_logits: bool = False) -> np.ndarray:
        lc, n_vocab = self.llama_cpp, self.llm.n_vocab()
        rows = []
        for start in range(0, len(tokens), self.llm.n_batch):
            chunk = list(tokens[start : start + self.llm.n_batch])
            self._make_room(len(chunk))
            self.batch.set_batch(chunk, n_past=self.n_past, logits_all=all_logits)
            rc = lc.llama_decode(self.ctx, self.batch.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            self.n_past += len(chunk)
            n_out = len(chunk) if all_logits else 1
            rows.append(np.ctypeslib.as_array(lc.llama_get_logits(self.ctx), shape=(n_out, n_vocab)).copy())
        out = np.concatenate(rows)
        return out if all_logits else out[-1]

    def settle(self) -> None:
        pass

    def cells(self) -> int:
        lc = self.llama_cpp
        return int(lc.llama_memory_seq_pos_max(self.mem, 0) - lc.llama_memory_seq_pos_min(self.mem, 0) + 1)

    def counters(self) -> dict:
        return {"cells": self.cells(), "n_shifts": self.n_shifts}


class PyllmkvStream:
    """pyllmkv's Session: evicts down to the budget before a batch that would not fit."""

    def __init__(self, lib, session):
        self.lib = lib
        self.session = session

    def decode(self, tokens, all_logits: bool = False) -> np.ndarray:
        return self.session.decode(tokens, all_logits=all_logits)

    def settle(self) -> None:
        self.session.evict()

    def counters(self) -> dict:
        st = self.lib.stats(self.session.ctx)
        return {"cells": st["n_seq_cells"], "kv_bytes": st["kv_bytes"], "n_evictions": st["n_evictions"],
                "t_evict_s": st["t_evict_us"] / 1e6, "value_norm_kernel": st["value_norm_kernel"],
                "window_attn_kernel": st["window_attn_kernel"]}


def package_module(name: str):
    """A module of pyllmkv that imports nothing of it, loaded by path: importing the package loads the patched libllama."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_rpc_servers(job: dict) -> None:
    """--rpc: the servers registered with pyllmkv's library before a model loads."""
    if job.get("rpc_servers"):
        from pyllmkv import rpc

        rpc.add_servers(job["rpc_servers"])


def llama_args(job: dict) -> dict:
    """The llama_cpp.Llama arguments every job shares."""
    return dict(n_batch=job["n_batch"], n_ubatch=job["n_batch"], n_threads=job["threads"],
                n_threads_batch=job["threads"], n_gpu_layers=job["n_gpu_layers"], verbose=False)


def open_stream(job: dict):
    common = llama_args(job)
    if job["engine"] in ("stock", "stock-shift"):
        os.environ["LLAMA_CPP_LIB_PATH"] = job["stock_lib"]
        package_module("_preload").libstdcxx_global()
        import llama_cpp

        if job.get("rpc_servers"):
            package_module("rpc").add_servers(job["rpc_servers"], llama_cpp.llama_cpp._lib)
        llm = llama_cpp.Llama(model_path=job["model"], n_ctx=job["n_ctx"], **common)
        return StockStream(llama_cpp, llm, job["n_ctx"], job["n_keep"] if job["engine"] == "stock-shift" else None)

    import pyllmkv
    from pyllmkv import _lib
    from pyllmkv.session import Session, context_size, sliding_window

    add_rpc_servers(job)

    config = pyllmkv.EvictConfig.for_cells(job["budget"], policy=job["policy"], window=job["window"],
                                           pool_kernel=job["pool_kernel"], prompt_tail=job["prompt_tail"],
                                           renumber=job["renumber"])
    n_ctx = context_size(sliding_window(job["model"]), config.cells, job["n_batch"])
    llm = pyllmkv.llama_cpp.Llama(model_path=job["model"], n_ctx=n_ctx, **common)
    return PyllmkvStream(_lib, Session(llm, config))


def generate(stream, prompt, n_new: int, settle: bool) -> tuple[list[int], float]:
    """Greedy continuation of prompt: (tokens, seconds spent generating them after the prompt). With settle, the
    cache is brought down to its budget once the prompt is in (scored with the prompt's end in the window)."""
    logits = stream.decode(prompt)
    if settle:
        stream.settle()
    out = [int(np.argmax(logits))]
    t0 = time.perf_counter()
    for _ in range(n_new - 1):
        out.append(int(np.argmax(stream.decode([out[-1]]))))
    return out, time.perf_counter() - t0


def run_ruler(job: dict) -> dict:
    """One RULER sample: the context prefilled once, then every (setting, policy, budget) branch's answer."""
    import pyllmkv
    from pyllmkv.bench.ruler import branch_answers
    from pyllmkv.session import Probe

    add_rpc_servers(job)
    # the chat-repeat setting's probe needs its room beside the budget + n_batch, which the context exceeds
    n_ctx = len(job["tokens"]) + len(job["probe"]) + len(job["question"]) + job["n_answer"] + job["n_batch"] + Probe.ROOM
    llm = pyllmkv.llama_cpp.Llama(model_path=job["model"], n_ctx=n_ctx, **llama_args(job))
    t0 = time.perf_counter()
    answers = branch_answers(llm, job["tokens"], job["question"], job["n_answer"], [tuple(b) for b in job["branches"]],
                             job["window"], job["pool_kernel"], job["probe"], renumber=job["renumber"])
    return {"answers": answers, "seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def time_speed(stream, tokens, n_decode: int) -> dict:
    """Seconds and tokens/s of the prompt's prefill, then of n_decode greedy tokens."""
    t0 = time.perf_counter()
    logits = stream.decode(tokens)
    # the prompt ends with the cache down to its budget, so the decode below measures attention over the budget;
    # an eviction recurs every n_batch decoded tokens, and costs what t_evict_s / n_evictions says
    stream.settle()
    prefill_s = time.perf_counter() - t0
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(stream.decode([tok])))
    decode_s = time.perf_counter() - t0
    return {"prefill_s": prefill_s, "decode_s": decode_s, "prefill_tps": len(tokens) / prefill_s,
            "decode_tps": n_decode / decode_s}


def run(job: dict) -> dict:
    if job["suite"] == "ruler":
        return run_ruler(job)
    stream = open_stream(job)
    tokens = job["tokens"]
    result: dict = {}
    if job["suite"] == "speed":
        result = time_speed(stream, tokens, job["n_decode"])
    elif job["suite"] == "needle":
        answer, _ = generate(stream, tokens, job["n_answer"], settle=job["settle_prompt"])
        result = {"answer_tokens": answer}
    elif job["suite"] == "ppl":
        nll, kept = [], []
        token_nll = package_module("surprisal").token_nll
        for start in range(0, len(tokens) - 1, job["n_batch"]):
            chunk = tokens[start : min(start + job["n_batch"], len(tokens) - 1)]
            logits = stream.decode(chunk, all_logits=True)
            nll.append(token_nll(logits, np.asarray(tokens[start + 1 : start + 1 + len(chunk)])))
            if job.get("dump_logits"):
                kept.append(logits)
        nll = np.concatenate(nll)
        if job.get("dump_logits"):
            np.save(job["dump_logits"], np.concatenate(kept))
        result = {"n_scored": int(len(nll)), "nll": float(nll.mean()), "ppl": float(np.exp(nll.mean()))}
    result.update(stream.counters())
    result["peak_rss_mib"] = peak_rss_mib()
    if job.get("rpc_servers"):
        result["devices"] = device_names()  # the remote hosts' memory is not this machine's VRAM
    elif job["n_gpu_layers"]:
        result["vram_mib"] = gpu_memory_used_mib()
    return result


def main() -> None:
    path = Path(sys.argv[1])
    job = json.loads(path.read_text())
    Path(str(path) + ".out").write_text(json.dumps(run(job)))


if __name__ == "__main__":
    main()
