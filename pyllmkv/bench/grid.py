"""What `pyllmkv bench` runs: the grid of each suite, and the three the CLI offers (FULL, --quick, --tiny)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .._lib import EvictConfig
from . import ruler


@dataclass
class Grid:
    """What each suite runs. Budgets are cells kept (the window included); contexts are tokens of prompt."""

    contexts: list            # speed: prompt lengths
    speed_budgets: list
    speed_policies: list      # at every speed budget
    other_policies: bool      # speed: the other POLICIES too, at the largest budget
    repeat: int               # speed repetitions (interleaved)
    n_decode: int             # speed: tokens decoded after the prompt
    needle_contexts: list
    needle_depths: list       # fractions of the haystack before the needle
    needle_budgets: list      # cells, or below 1 a fraction of the context
    ppl_tokens: int
    ppl_budgets: list
    perturb_context: int
    perturb_budget: int
    window: int = 32
    pool_kernel: int = EvictConfig.pool_kernel  # pooling of the window scores, every pyllmkv job and the perturbation suite
    n_answer: int = 10        # tokens generated for a needle answer
    # needle, pyllmkv: "chunked" (batches of n_batch, evicting between them, as chat does) or "whole" (the prompt in
    # one batch, then one eviction with the question in the window: the paper's and kvpress's setting)
    needle_prefill: str = "chunked"
    n_batch: int = 512        # tokens per decode, unless -b says otherwise
    ppl_policies: Optional[list] = None  # perplexity: only these POLICIES (stock full and shift always run); None: all
    needle_policies: Optional[list] = None  # needle: the same
    needle_keys: int = 1      # pass keys per depth, the same at every context: one prompt each
    prompt_tail: bool = True  # pyllmkv: EvictConfig.prompt_tail
    renumber: bool = EvictConfig.renumber  # pyllmkv: what follows an eviction reads the kept cells renumbered from 0
    # ruler: RULER-style tasks, question-agnostic and question-aware (ruler.py); budgets below 1 are shares of the context
    ruler_contexts: list = field(default_factory=lambda: [2048, 4096])
    ruler_budgets: list = field(default_factory=lambda: [0.1, 0.2, 0.4])
    ruler_samples: int = 10   # per task and context
    ruler_seed: int = 0       # another seed draws other samples of the same tasks, to add samples to a committed run
    ruler_tasks: Optional[list] = None     # None: ruler.TASKS
    ruler_policies: Optional[list] = None  # None: RULER_POLICIES (the full cache always runs)
    ruler_settings: list = field(default_factory=lambda: list(ruler.DEFAULT_SETTINGS))


FULL = Grid(contexts=[1024, 4096, 16384, 32768], speed_budgets=[256, 512, 1024], speed_policies=["criticalkv-ada", "snapkv"],
            other_policies=True, repeat=3, n_decode=64, needle_contexts=[1024, 2048, 4096, 8192],
            needle_depths=[0, 0.25, 0.5, 0.75, 1.0], needle_budgets=[256, 512, 1024, 0.125], ppl_tokens=32768,
            ppl_budgets=[256, 512, 1024], perturb_context=4096, perturb_budget=512)
# under 10 minutes on 2 cores with SmolLM2-135M
QUICK = Grid(contexts=[2048], speed_budgets=[512], speed_policies=["criticalkv-ada", "snapkv"], other_policies=False,
             repeat=2, n_decode=32, needle_contexts=[1024], needle_depths=[0, 0.25, 0.5, 0.75, 1.0], needle_budgets=[0.125],
             ppl_tokens=2048, ppl_budgets=[256], perturb_context=1024, perturb_budget=128, ruler_contexts=[1024],
             ruler_budgets=[0.2], ruler_samples=1)
# the harness on the tiny test model (CI): every suite and every policy, a few seconds each
TINY = Grid(contexts=[256, 512], speed_budgets=[64, 128], speed_policies=["criticalkv-ada", "snapkv"], other_policies=True,
            repeat=2, n_decode=8, needle_contexts=[256], needle_depths=[0, 0.5, 1.0], needle_budgets=[64, 0.25],
            ppl_tokens=600, ppl_budgets=[64, 128], perturb_context=256, perturb_budget=64, window=8, n_answer=4, n_batch=32,
            ruler_contexts=[256], ruler_budgets=[0.25], ruler_samples=1, ruler_tasks=["niah_single", "vt"])
