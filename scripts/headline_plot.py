"""The README's headline plot, from committed bench runs: decode speed and KV memory against context (stock full
cache, stock context shift, pyllmkv), and what a budget keeps when the question comes after the eviction.

    python scripts/headline_plot.py --speed docs/bench/RUN [RUN...] --ruler docs/bench/RUN [--policies criticalkv,...] [--speed-policies ...] -o docs/headline.png

Several speed runs (e.g. one more context, run later) are drawn as one: a row of a later run replaces the same
context and configuration of an earlier one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pyllmkv.bench.report import ruler_line, ruler_summary  # noqa: E402
from pyllmkv.bench.ruler import FULL  # noqa: E402

STOCK = {"stock full": ("k", "--"), "stock shift": ("tab:gray", "-")}


def model_name(results: dict) -> str:
    return Path(results["meta"]["model"]).stem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", type=Path, nargs="+", required=True, help="run folders with the speed suite")
    ap.add_argument("--ruler", type=Path, required=True, help="a run folder with the ruler suite")
    ap.add_argument("--policies", default="criticalkv,defensivekv", help="pyllmkv's lines")
    ap.add_argument("--speed-policies", default=None,
                    help="pyllmkv's lines in the speed panels [default: --policies]; leave out a policy whose runs differ in "
                         "more than the context (e.g. a change of its cells between them)")
    ap.add_argument("--budget", type=int, default=1024, help="the speed run's budget to show (stock shift's too)")
    ap.add_argument("-o", "--out", type=Path, default=Path("docs/headline.png"))
    args = ap.parse_args()
    policies = args.policies.split(",")
    runs = [json.loads((d / "results.json").read_text()) for d in args.speed]
    speed = runs[0]
    speed["speed"] = list({(r["context"], r["policy"], r["budget"]): r for run in runs for r in run["speed"]}.values())
    ruler = json.loads((args.ruler / "results.json").read_text())

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = [r for r in speed["speed"] if r["policy"] == "stock full" or r["budget"] == args.budget]
    for label in [*STOCK, *(args.speed_policies.split(",") if args.speed_policies else policies)]:
        rs = sorted((r for r in rows if r["policy"] == label), key=lambda r: r["context"])
        if not rs:
            continue
        color, style = STOCK.get(label, (None, "-"))
        name = {"stock full": label}.get(label, f"{'' if label in STOCK else 'pyllmkv '}{label} @{args.budget}")
        x = [r["context"] for r in rs]
        axes[0].plot(x, [r["decode_tps"] for r in rs], marker="o", color=color, linestyle=style, label=name)
        axes[1].plot(x, [r["kv_bytes"] / 2**20 for r in rs], marker="o", color=color, linestyle=style, label=name)
    for ax, title in zip(axes, ("decode tokens/s", "KV cache MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(f"{title} ({model_name(speed)}, {speed['meta']['threads']} CPU threads)", fontsize=9)
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[0].legend(fontsize=8)

    summary = [r for r in ruler_summary(ruler["ruler"]) if r["setting"] in ("agnostic", "repeat")]
    context = max(r["context"] for r in summary)
    summary = [r for r in summary if r["context"] == context]
    ax = axes[2]
    for r in summary:
        if r["policy"] == FULL and r["setting"] == "agnostic":
            ax.axhline(100 * r["mean"], color="k", linestyle="--", label="full cache")
    # streaming keeps the cells stock context shift keeps (4 sinks + the most recent); a run with the repeat setting
    # draws each policy scored by KVzip's probe too, in the same color
    for i, policy in enumerate(["streaming", *policies]):
        for setting, style in (("agnostic", "-"), ("repeat", ":")):
            rs = [r for r in summary if r["policy"] == policy and r["setting"] == setting]
            if not rs or (policy == "streaming" and setting == "repeat"):
                continue
            label = "stock shift's cells (streaming)" if policy == "streaming" else f"pyllmkv {policy}"
            label += ", scored by a repeat of the document" if setting == "repeat" else ""
            color = STOCK["stock shift"][0] if policy == "streaming" else f"C{i}"
            ruler_line(ax, rs, context, color=color, linestyle=style, label=label)
    n = max(r["n"] for r in summary)
    ax.set_title(f"facts kept when the question comes after the eviction\n(RULER-style, {model_name(ruler)}, "
                 f"{context} tokens, {n} samples)", fontsize=9)
    ax.set_xlabel("budget / context")
    ax.set_ylabel("score (%), 95 % CI")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
