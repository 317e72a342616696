"""The README's headline plot, from committed bench runs: decode speed and KV memory against context (stock full
cache, stock context shift, pyllmkv), and what a budget keeps when the question comes after the eviction: score
against budget per policy (--ruler), or a bar per policy for runs of the chat setting on the same samples (--chat).

    python scripts/headline_plot.py --speed docs/bench/RUN [RUN...] --ruler docs/bench/RUN [--policies criticalkv,...] [--speed-policies ...] -o docs/headline.png
    python scripts/headline_plot.py --speed docs/bench/RUN [RUN...] --chat docs/bench/RUN [RUN...] --policies defensivekv-layer,surprisal -o docs/headline.png

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

from pyllmkv._lib import DEFAULT_POLICY  # noqa: E402
from pyllmkv.bench.report import ruler_line, ruler_summary  # noqa: E402
from pyllmkv.bench.ruler import FULL  # noqa: E402

STOCK = {"stock full": ("k", "--"), "stock shift": ("tab:gray", "-")}


def model_name(results: dict) -> str:
    return Path(results["meta"]["model"]).stem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", type=Path, nargs="+", required=True, help="run folders with the speed suite")
    panel = ap.add_mutually_exclusive_group(required=True)
    panel.add_argument("--ruler", type=Path, help="a run folder with the ruler suite")
    panel.add_argument("--chat", type=Path, nargs="+", help="run folders with the ruler suite's chat setting, on the same samples")
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

    if args.chat:
        chat_bars(axes[2], [json.loads((d / "results.json").read_text()) for d in args.chat], policies)
    else:
        ruler_lines(axes[2], json.loads((args.ruler / "results.json").read_text()), policies)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def chat_bars(ax, runs: list[dict], policies: list[str]) -> None:
    """A bar per policy (and the full cache, from the first run: each run answers the same samples with it) with its
    95 % interval, for the chat setting at its one budget."""
    rows = [r for i, run in enumerate(runs) for r in run["ruler"]
            if r["setting"] == "chat" and (i == 0 or r["policy"] != FULL)]
    summary = {r["policy"]: r for r in ruler_summary(rows)}
    bars = [summary[FULL], *(summary[p] for p in policies)]
    names = ["full cache", *(p.replace("-", "-\n", 1) + ("\n(default)" if p == DEFAULT_POLICY else "") for p in policies)]
    means = [100 * r["mean"] for r in bars]
    ax.bar(range(len(bars)), means, color=["k", *(f"C{i}" for i in range(len(policies)))], alpha=0.8,
           yerr=[[m - 100 * r["ci"][0] for m, r in zip(means, bars)], [100 * r["ci"][1] - m for m, r in zip(means, bars)]],
           capsize=4)
    for x, m in enumerate(means):
        ax.text(x, 2, f"{m:.0f} %", ha="center", color="w", fontsize=9)
    ax.set_xticks(range(len(bars)), names, fontsize=8)
    r = bars[1]
    ax.set_title(f"facts kept when a chat reads a document, then is asked (RULER-style)\n{model_name(runs[0])}, "
                 f"{r['context']} tokens read in {r['budget']} cells, {r['n']} samples", fontsize=9)
    ax.set_ylabel("score (%), 95 % CI")
    ax.set_ylim(0, 102)


def ruler_lines(ax, ruler: dict, policies: list[str]) -> None:
    summary = [r for r in ruler_summary(ruler["ruler"]) if r["setting"] in ("agnostic", "repeat")]
    context = max(r["context"] for r in summary)
    summary = [r for r in summary if r["context"] == context]
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


if __name__ == "__main__":
    main()
