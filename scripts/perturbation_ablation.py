"""Which part of the selection rule moves the per-head output perturbation (the bench's perturb suite)?

  python scripts/perturbation_ablation.py MODEL.gguf [--context 4096] [--budget 512]

Part 1 runs the hook: criticalkv against snapkv with the observation-window scores pooled over 5 cells (SnapKV's
kernel; the hook's default is 13) and unpooled (kernel 1). Part 2 takes the same window queries and K/V rows and applies, in numpy, rules
the hook does not implement, each against snapkv pooled and unpooled:
  - criticalkv with a centred value norm, |(V_i - mean_q o_q) W_O^h|_1 -- is |V_i W_O^h|_1 dominated by a component
    all values share?
  - the first-order cost of evicting cell i, mean_q A_qi |(V_i - o_q) W_O^h|_1, ranked on its own.
Reported per rule: the share of query heads where it perturbs less, and the geometric mean of the ratio.
"""

from __future__ import annotations

import argparse

import numpy as np

from pyllmkv._lib import EvictConfig, llama_cpp
from pyllmkv.bench import haystack
from pyllmkv.bench.perturb import _capture, attention, output_projections, perturbation, summary
from pyllmkv.reference import avg_pool, top_k  # the numpy oracle the hook's tests use


def numpy_rules(model: str, tokens, budget: int, window: int, threads: int) -> dict:
    config = EvictConfig(budget=budget, policy="snapkv", granularity="head", window=window)
    queries, rows, _, n_kv = _capture(model, tokens, config, 512, threads, 0, read_rows=True)
    w_o = output_projections(model, queries)
    out: dict = {}
    for il in sorted(queries):
        q_pos, q, scale = queries[il]
        pos, k, v = rows[il]
        k, v = k.astype(np.float64), v.astype(np.float64)
        hd = k.shape[2]
        n_head = q.shape[1] // hd
        group = n_head // n_kv
        q = q.reshape(len(q_pos), n_head, hd).astype(np.float64)
        in_window = pos > pos.max() - window  # always kept, outside the ranking
        n_ranked = budget - int(in_window.sum())
        for g in range(n_kv):
            heads = range(g * group, (g + 1) * group)
            a, o, w = {}, {}, {}
            for h in heads:
                logits = (q[:, h] @ k[:, g].T) * scale
                logits[pos[None, :] > q_pos[:, None]] = -np.inf
                e = np.exp(logits - logits.max(axis=1, keepdims=True))
                a[h] = e / e.sum(axis=1, keepdims=True)
                o[h] = a[h] @ v[:, g]
                w[h] = w_o[il][:, h * hd:(h + 1) * hd].astype(np.float64)
            s_raw = np.mean([a[h].mean(axis=0) for h in heads], axis=0)
            s_raw[in_window] = 0
            s_pool = s_raw.copy()
            s_pool[~in_window] = avg_pool(s_raw[~in_window], 5)
            centred = np.mean([np.abs((v[:, g] - o[h].mean(axis=0)) @ w[h].T).sum(axis=1) for h in heads], axis=0)
            first_order = np.zeros(len(pos))
            for h in heads:
                vw, ow = v[:, g] @ w[h].T, o[h] @ w[h].T
                for j in range(len(q_pos)):
                    first_order += a[h][j] * np.abs(vw - ow[j]).sum(axis=1) / (len(q_pos) * group)

            def two_stage(s, c, ratio):
                keep = in_window.copy()
                n_first = int(np.floor(n_ranked * ratio))
                keep[top_k(s, n_first, keep)] = True
                keep[top_k(c, n_ranked - n_first, keep)] = True
                return keep

            rules = {"snapkv pooled": two_stage(s_pool, s_pool, 1.0), "snapkv unpooled": two_stage(s_raw, s_raw, 1.0),
                     "criticalkv, centred norm": two_stage(s_pool, (s_pool + 1e-4) * centred, 0.5),
                     "first-order cost": two_stage(s_raw, first_order, 0.0)}
            for h in heads:
                for name, keep in rules.items():
                    part = attention(q[:, h], q_pos, k[:, g], v[:, g], pos, keep, scale)
                    out.setdefault(name, []).append(float(np.abs((o[h] - part) @ w[h].T).sum(axis=1).mean()))
    return {name: np.asarray(vals) for name, vals in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    llm = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    tokens = llm.tokenize(haystack.text()[0].encode(), add_bos=True)[: args.context]
    llm.close()

    print(f"{args.model}: {args.context} tokens, budget {args.budget}, window {args.window}")
    print("| rule | against | heads lower | geometric mean ratio |\n|---|---|---|---|")
    for kernel in (5, 1):
        r = perturbation(args.model, tokens, args.budget, args.window, threads=args.threads, pool_kernel=kernel)
        s = summary(r)
        print(f"| hook criticalkv, pool {kernel} | hook snapkv, pool {kernel} | {s['lower']}/{s['n_heads']} "
              f"({100 * s['share_lower']:.1f} %) | {np.exp(np.mean(s['log_ratio'])):.3f} |")
    rules = numpy_rules(args.model, tokens, args.budget, args.window, args.threads)
    for base in ("snapkv pooled", "snapkv unpooled"):
        for name, vals in rules.items():
            if name != base:
                lower = int((vals < rules[base]).sum())
                ratio = np.exp(np.mean(np.log(vals / rules[base])))
                print(f"| numpy {name} | numpy {base} | {lower}/{vals.size} ({100 * lower / vals.size:.1f} %) | {ratio:.3f} |")


if __name__ == "__main__":
    main()
