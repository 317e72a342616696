"""results.md and the PNG plots of a bench run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from . import STOCK_FULL, STOCK_SHIFT
from .ruler import FULL as RULER_FULL

NEEDLE_PREFILL = {
    "chunked": "pyllmkv prefills the prompt in batches, evicting before a batch that would pass budget + batch cells "
               "(as chat does), so the question is read after most of the prompt was evicted.",
    "whole": "pyllmkv prefills the prompt in one batch, then evicts once down to the budget with the question in the "
             "observation window (the paper's setting; cells while prefilling: budget + prompt). Stock shift as ever.",
}


def _label(r: dict) -> str:
    return r["policy"] if r["policy"] == STOCK_FULL else f"{r['policy']} @{r.get('budget_label', r['budget'])}"


def _order(r: dict):
    stock = {STOCK_FULL: 0, STOCK_SHIFT: 1}
    return (r["policy"] != STOCK_FULL, r.get("budget_label") or f"{r['budget']:08d}", stock.get(r["policy"], 2), r["policy"])


def speed_table(rows: list[dict]) -> list[str]:
    vram = any(r.get("vram_mib") for r in rows)
    out = ["| context | config | prefill tok/s (min-max) | decode tok/s (min-max) | decode / stock full | "
           "prefill / stock shift | decode / stock shift | KV MiB | KV / stock full | peak RSS MiB | "
           + ("GPU MiB | " if vram else "") + "cells after | ms per eviction |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if vram else "")]

    def ratio(r, key):
        return f"{r[key]:.2f}" if key in r else "-"

    for r in sorted(rows, key=lambda r: (r["context"], _order(r))):
        evict_ms = f"{1000 * r['evict_s']:.0f}" if r.get("evict_s") else "-"
        out.append(f"| {r['context']} | {_label(r)} | {r['prefill_tps']:.0f} ({r['prefill_tps_min']:.0f}-{r['prefill_tps_max']:.0f}) "
                   f"| {r['decode_tps']:.1f} ({r['decode_tps_min']:.1f}-{r['decode_tps_max']:.1f}) | {r['decode_vs_stock']:.2f} "
                   f"| {ratio(r, 'prefill_vs_shift')} | {ratio(r, 'decode_vs_shift')} "
                   f"| {r['kv_bytes'] / 2**20:.1f} | {r['kv_vs_stock']:.3f} | {r['peak_rss_mib']:.0f} | "
                   + (f"{r['vram_mib']:.0f} | " if vram else "") + f"{r['cells']} | {evict_ms} |")
    return out


def needle_accuracy(rows: list[dict], by: Callable[[dict], tuple] = lambda r: (_label(r), r["context"])) -> dict:
    """{by(row): the share of those rows' needles found}; by default per (label, context), over depths and keys."""
    found: dict = {}
    for r in rows:
        found.setdefault(by(r), []).append(r["correct"])
    return {k: float(np.mean(v)) for k, v in found.items()}


def needle_table(rows: list[dict]) -> list[str]:
    contexts = sorted({r["context"] for r in rows})
    acc = needle_accuracy(rows)
    overall = needle_accuracy(rows, by=_label)
    labels = []
    for r in sorted(rows, key=_order):
        if _label(r) not in labels:
            labels.append(_label(r))
    out = ["| config | " + " | ".join(f"{c} tokens" for c in contexts) + " | all |",
           "|---|" + "---|" * (len(contexts) + 1)]
    for lab in labels:
        cells = [acc.get((lab, c)) for c in contexts]
        out.append(f"| {lab} | " + " | ".join("-" if a is None else f"{100 * a:.0f} %" for a in cells) + f" | {100 * overall[lab]:.0f} % |")
    return out


def ppl_table(rows: list[dict]) -> list[str]:
    out = ["| config | perplexity | vs stock full | cells after | evictions or shifts |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=_order):
        n = r.get("n_evictions", r.get("n_shifts", 0))
        out.append(f"| {_label(r)} | {r['ppl']:.3f} | {r['ppl_vs_full']:.3f} | {r['cells']} | {n} |")
    return out


def perturb_lines(p: dict) -> list[str]:
    lines = [f"Context {p['context']} tokens, budget {p['budget']}, window {p['window']}, head-wise; "
             f"{p['summary']['n_heads']} (layer, query head) pairs over {len(p['layers'])} layers. Measured on the "
             f"window's queries (those that chose the eviction) and on the queries of the {p['window']} tokens that "
             "follow the context (the ones eviction is for).", "",
             "| queries | | criticalkv | snapkv |", "|---|---|---|---|"]
    for label, s in (("window", p["summary"]), ("next tokens", p.get("future_summary"))):
        if s is None:  # a run made before the next tokens were measured
            continue
        lines += [f"| {label} | mean L1 perturbation of a head's projected output | {s['mean_a']:.4f} | {s['mean_b']:.4f} |",
                  f"| {label} | heads where it is the lower | {s['lower']} ({100 * s['share_lower']:.1f} %) | "
                  f"{s['n_heads'] - s['lower'] - s['equal']} |", f"| {label} | heads where they are equal | {s['equal']} | |"]
    return lines


def bootstrap_ci(scores: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean, resampling the samples with replacement."""
    x = np.asarray(scores, dtype=float)
    means = np.random.default_rng(seed).choice(x, size=(n, len(x))).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def ruler_summary(rows: list[dict]) -> list[dict]:
    """Per (context, setting, policy, budget): the mean score over every sample with its interval, per task, and the
    ratio to the full cache on the same samples."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["context"], r["setting"], r["policy"], r["budget"], r["budget_label"]), []).append(r)
    full = {(c, st): rs for (c, st, p, _, _), rs in groups.items() if p == RULER_FULL}
    out = []
    for (context, setting, policy, budget, label), rs in groups.items():
        mean = float(np.mean([r["score"] for r in rs]))
        lo, hi = bootstrap_ci([r["score"] for r in rs])
        tasks = {}
        for r in rs:
            tasks.setdefault(r["task"], []).append(r["score"])
        full_mean = float(np.mean([r["score"] for r in full[(context, setting)]]))
        out.append(dict(context=context, setting=setting, policy=policy, budget=budget, budget_label=label, n=len(rs),
                        mean=mean, ci=(lo, hi), tasks={t: float(np.mean(v)) for t, v in tasks.items()},
                        vs_full=mean / full_mean if full_mean > 0 else float("nan")))
    return sorted(out, key=lambda r: (r["context"], r["setting"], r["policy"] != RULER_FULL, r["budget"], r["policy"]))


RULER_SETTING = {"agnostic": "question-agnostic: the context evicted with its own last window queries, then the question",
                 "aware": "question-aware: context and question prefilled, evicted once with the question in the window",
                 "repeat": "question-agnostic, scored by a request to repeat the context (KVzip's probe), then the question",
                 "chat": "question-agnostic, the context read in batches inside the budget as chat reads it, each eviction "
                         "scored by the context's tail (surprisal: by the words the model predicted worst as it read "
                         "them), then the question",
                 "chat-repeat": "question-agnostic, the context read in batches inside the budget, each eviction scored "
                                "by a request to repeat the text read since the last (repeat_probe), then the question",
                 "chat-question": "an oracle: the context read in batches inside the budget, each eviction scored by "
                                  "the question still to come (no chat knows it), then the question",
                 "chat-facts": "question-agnostic, the context read in batches inside the budget, each eviction scored "
                               "by one fixed question asking for the text's facts (session.FactsProbe), then the question"}
RULER_SETTING_TITLE = {"agnostic": "question-agnostic", "aware": "question-aware", "repeat": "repeat probe (agnostic)",
                       "chat": "read as chat reads it", "chat-repeat": "read as chat reads it, repeat probe",
                       "chat-question": "read as chat reads it, question oracle",
                       "chat-facts": "read as chat reads it, facts probe"}


def ruler_line(ax, rows: list[dict], context: int, **style) -> None:
    """One policy's ruler_summary rows as mean score (%) against budget / context, with the 95 % interval as error bars."""
    pts = sorted((r["budget"] / context, r) for r in rows)
    ax.errorbar([b for b, _ in pts], [100 * r["mean"] for _, r in pts], marker="o", capsize=3,
                yerr=[[100 * (r["mean"] - r["ci"][0]) for _, r in pts], [100 * (r["ci"][1] - r["mean"]) for _, r in pts]],
                **style)


def ruler_tables(rows: list[dict]) -> list[str]:
    summary = ruler_summary(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))  # in the order they ran
    out = []
    for context, setting in dict.fromkeys((r["context"], r["setting"]) for r in summary):
        out += [f"### {context} tokens, {RULER_SETTING[setting]}", "",
                "| policy | budget | " + " | ".join(tasks) + " | mean [95 % CI] | / full cache | samples |",
                "|---|---|" + "---|" * len(tasks) + "---|---|---|"]
        for r in summary:
            if (r["context"], r["setting"]) == (context, setting):
                out.append(f"| {r['policy']} | {r['budget_label'] or '-'} | "
                           + " | ".join(f"{100 * r['tasks'].get(t, float('nan')):.0f}" for t in tasks)
                           + f" | {100 * r['mean']:.1f} [{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}] | "
                           f"{r['vs_full']:.2f} | {r['n']} |")
        out.append("")
    return out


def markdown(results: dict) -> str:
    m = results["meta"]
    out = [f"# pyllmkv bench: {Path(m['model']).name}", "",
           f"`{m['command']}` ({m['started']}; {m['threads']} threads, batch {m['n_batch']}, -ngl {m['n_gpu_layers']}"
           f"{', the layers on the RPC servers ' + m['rpc_servers'] + ' in every job' if m.get('rpc_servers') else ''}). "
           f"Stock: the same pinned llama.cpp (llama-cpp-python {m['llama_cpp_python']}'s) unpatched. Text: {m['text']}. "
           f"The model was trained on {m['n_ctx_train']} positions."
           # runs from before the prompt tail existed have no such key: their prompts were evicted by each batch's end
           + (" pyllmkv evicts a prompt longer than the cache with the queries of its last window tokens (prompt tail; "
              "not in the perplexity suite, where it would choose evictions with the tokens being scored)."
              if m["grid"].get("prompt_tail") else "")
           + (" What follows each eviction reads the kept cells renumbered from 0 (--renumber)."
              if m["grid"].get("renumber") else ""), ""]
    if "speed" in results:
        g = m["grid"]
        out += ["## Speed and memory", "",
                f"Prefill the prompt (batches of {m['n_batch']}), then decode {g['n_decode']} tokens greedily; medians of "
                f"{g['repeat']} interleaved runs, each in a fresh process. KV MiB: what llama.cpp allocated. "
                f"Stock shift: llama.cpp's context shift in budget + batch cells, keeping the first 4 tokens.", ""]
        out += speed_table(results["speed"]) + [""]
        if m.get("speed_contexts_skipped"):
            out += [f"Skipped (stock's full cache would take over half of the memory): {m['speed_contexts_skipped']}.", ""]
    if "needle" in results:
        n_keys = m["grid"].get("needle_keys", 1)
        out += ["## Needle in a haystack (pass key, exact match)", "",
                f"Depths {', '.join(f'{100 * d:.0f} %' for d in m['grid']['needle_depths'])}; "
                + (f"{n_keys} pass keys per depth, the same at every context; accuracy over depths and keys. " if n_keys > 1
                   else "accuracy over depths. ")
                + NEEDLE_PREFILL[m["grid"]["needle_prefill"]], ""]
        out += needle_table(results["needle"]) + [""]
    if "ppl" in results:
        r0 = results["ppl"][0]
        out += ["## Perplexity under a budget", "", f"{r0['tokens']} tokens of the text streamed through each cache.", ""]
        out += ppl_table(results["ppl"]) + [""]
    if "perturb" in results:
        out += ["## Output perturbation per head (criticalkv vs snapkv)", ""] + perturb_lines(results["perturb"]) + [""]
    if "ruler" in results:
        out += ["## Retention: RULER-style tasks (score: share of the expected values in the greedy answer, %)", "",
                "Each sample's context is prefilled once with the whole cache and saved; each policy and budget loads it, "
                "evicts once and answers. Budgets are shares of the context, the window included. streaming keeps "
                "what stock context shift would (4 sinks + the most recent cells).", ""]
        out += ruler_tables(results["ruler"])
    return "\n".join(out)


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(out / name)

    if "speed" in results:
        rows = results["speed"]
        fig, axes = plt.subplots(1, 3, figsize=(16, 5))
        for lab in dict.fromkeys(_label(r) for r in sorted(rows, key=_order)):
            rs = sorted((r for r in rows if _label(r) == lab), key=lambda r: r["context"])
            x = [r["context"] for r in rs]
            for ax, key in zip(axes, ("prefill_tps", "decode_tps")):
                ax.plot(x, [r[key] for r in rs], marker="o", label=lab)
            axes[2].plot(x, [r["kv_bytes"] / 2**20 for r in rs], marker="o", label=lab)
        for ax, title in zip(axes, ("prefill tokens/s", "decode tokens/s", "KV cache MiB")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_title(title)
        axes[2].set_yscale("log")
        axes[2].legend(fontsize=7)
        save(fig, "speed.png")
    if "needle" in results:
        rows = results["needle"]
        contexts = sorted({r["context"] for r in rows})
        depths = sorted({r["depth"] for r in rows})
        labels = list(dict.fromkeys(_label(r) for r in sorted(rows, key=_order)))
        cols = min(4, len(labels))
        fig, axes = plt.subplots(-(-len(labels) // cols), cols, figsize=(3.2 * cols, 2.6 * -(-len(labels) // cols)), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        acc = needle_accuracy(rows, by=lambda r: (_label(r), r["depth"], r["context"]))
        for ax, lab in zip(axes.ravel(), labels):
            grid = np.full((len(depths), len(contexts)), np.nan)
            for (label, depth, context), a in acc.items():
                if label == lab:
                    grid[depths.index(depth), contexts.index(context)] = a
            ax.axis("on")
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_title(lab, fontsize=9)
            ax.set_xticks(range(len(contexts)), [str(c) for c in contexts], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=7)
        save(fig, "needle.png")
    if "ppl" in results:
        rows = sorted(results["ppl"], key=_order)
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.bar(range(len(rows)), [r["ppl"] for r in rows])
        ax.set_xticks(range(len(rows)), [_label(r) for r in rows], rotation=70, fontsize=7)
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        save(fig, "perplexity.png")
    if "perturb" in results:
        p = results["perturb"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].hist(p["summary"]["log_ratio"], bins=40, alpha=0.6, label="window's queries")
        if "future_summary" in p:
            axes[0].hist(p["future_summary"]["log_ratio"], bins=40, alpha=0.6, label="next tokens' queries")
        axes[0].legend(fontsize=7)
        axes[0].axvline(0, color="k")
        axes[0].set_xlabel("log(criticalkv / snapkv) perturbation per head")
        axes[1].plot(p["layers"], np.mean(p["criticalkv"], axis=1), marker="o", label="criticalkv")
        axes[1].plot(p["layers"], np.mean(p["snapkv"], axis=1), marker="o", label="snapkv")
        axes[1].set_xlabel("layer")
        axes[1].set_ylabel("mean L1 perturbation")
        axes[1].legend()
        save(fig, "perturbation.png")
    if "ruler" in results:
        summary = ruler_summary(results["ruler"])
        keys = list(dict.fromkeys((r["context"], r["setting"]) for r in summary))
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
        for ax, (context, setting) in zip(axes[0], keys):
            rs = [r for r in summary if (r["context"], r["setting"]) == (context, setting)]
            for r in rs:
                if r["policy"] == RULER_FULL:
                    ax.axhline(100 * r["mean"], color="k", linestyle="--", label=RULER_FULL)
            for policy in dict.fromkeys(r["policy"] for r in rs if r["policy"] != RULER_FULL):
                ruler_line(ax, [r for r in rs if r["policy"] == policy], context, label=policy)
            ax.set_title(f"{context} tokens, {RULER_SETTING_TITLE[setting]}", fontsize=10)
            ax.set_xlabel("budget / context")
            ax.set_ylabel("score (%)")
            ax.set_ylim(-2, 102)
        axes[0][-1].legend(fontsize=8)
        save(fig, "ruler.png")
    return files


def write(results: dict, out: Path) -> None:
    (out / "results.md").write_text(markdown(results))
    plots(results, out)
