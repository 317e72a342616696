#!/usr/bin/env python3
"""Construction time of pyllmkv.Llama against llama_cpp.Llama on the same library and model, best of N, alternating.

  python scripts/construct_time.py [MODEL.gguf ...] [--repeat N]     (default: SmolLM2 and Qwen2.5-Coder 1.5B)
"""

from __future__ import annotations

import argparse
import time

import pyllmkv
from pyllmkv import models


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    paths = args.models or [str(models.smollm2()), str(models.qwen25_coder_1_5b())]
    for path in paths:
        best = {"llama_cpp.Llama": float("inf"), "pyllmkv.Llama": float("inf")}
        for _ in range(args.repeat):
            for name, make in (("llama_cpp.Llama", lambda: pyllmkv.llama_cpp.Llama(model_path=path, n_ctx=1536, verbose=False)),
                               ("pyllmkv.Llama", lambda: pyllmkv.Llama(path, kv_budget=1024, verbose=False))):
                t0 = time.perf_counter()
                llm = make()
                best[name] = min(best[name], time.perf_counter() - t0)
                llm.close()
        ratio = best["pyllmkv.Llama"] / best["llama_cpp.Llama"]
        print(f"{path.split('/')[-1]}: llama_cpp.Llama {best['llama_cpp.Llama']:.3f} s, pyllmkv.Llama "
              f"{best['pyllmkv.Llama']:.3f} s ({ratio:.2f}x), best of {args.repeat}")


if __name__ == "__main__":
    main()
