#!/usr/bin/env python3
"""Paired bootstrap of two ruler runs' per-sample scores on the same samples (sample numbers counted within each task,
so runs of different task lists pair up; runs of other --ruler-seed values add their own samples): the mean difference
A - B in points, its 95 % interval over 10,000 resamples of the differences, and on how many samples A did better or
worse. A and B may each be several runs, comma-separated.

    python scripts/ruler_paired.py A/results.json[,A2/results.json] SETTING POLICY B/results.json[,...] SETTING POLICY
"""

from __future__ import annotations

import json
import sys

import numpy as np


def scores(paths: str, setting: str, policy: str) -> dict:
    out = {}
    for path in paths.split(","):
        run = json.load(open(path))
        seed = run["meta"]["grid"].get("ruler_seed", 0)
        first: dict = {}
        for r in run["ruler"]:
            first[r["task"]] = min(first.get(r["task"], r["sample"]), r["sample"])
        out.update({(seed, r["task"], r["sample"] - first[r["task"]]): r["score"] for r in run["ruler"]
                    if r["setting"] == setting and r["policy"] == policy})
    return out


def main() -> None:
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    a, b = scores(*sys.argv[1:4]), scores(*sys.argv[4:7])
    keys = sorted(set(a) & set(b))
    if not keys:
        sys.exit("the two runs share no sample of that setting and policy")
    d = np.array([a[k] - b[k] for k in keys]) * 100
    boot = np.random.default_rng(0).choice(d, (10000, len(d))).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    print(f"{len(d)} samples: A {np.mean([a[k] for k in keys]) * 100:.1f} %, B {np.mean([b[k] for k in keys]) * 100:.1f} %, "
          f"A - B {d.mean():+.1f} points [{lo:+.1f}, {hi:+.1f}], better on {int((d > 0).sum())}, worse on {int((d < 0).sum())}")


if __name__ == "__main__":
    main()
