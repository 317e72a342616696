"""Policies as the library describes them (llama_kv_evict_policy_describe): the list the Python side derives, the
parts each policy is made of against what the hook does with it, and parameters checked before any model loads."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_tokens
from pyllmkv import _lib
from pyllmkv._lib import DEFAULT_POLICY, POLICIES, POLICY_INFO, EvictConfig, KVEvictError
from pyllmkv.cli import main
from pyllmkv.session import Session
from test_hook import _llama

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_library_lists_the_policies_the_readme_documents():
    documented = set()
    for row in re.findall(r"^\| (`[a-z0-9-]+`.*?) \|", README.read_text(), flags=re.M):
        documented |= set(re.findall(r"`([a-z0-9-]+)`", row.split("|")[0]))
    assert set(POLICIES) == documented
    assert sorted(POLICIES.values()) == list(range(len(POLICIES)))
    with pytest.raises(KVEvictError, match="unknown policy 99"):
        _lib._check(_lib._describe(99, None))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_shared_heads_need_head_granularity_and_hold_twice_the_budget(llama_cpp, tiny_path, policy):
    """A policy described as sharing heads is refused at token granularity and may hold up to 2 x budget - window
    cells after an eviction; the others are accepted and hold the budget."""
    info = POLICY_INFO[policy]
    assert info.shares_heads == (info.allocation != "uniform")
    llm = _llama(llama_cpp, tiny_path)
    token = EvictConfig(budget=40, window=8, policy=policy, granularity="token")
    if info.shares_heads:
        with pytest.raises(KVEvictError, match="use granularity head"):
            _lib.enable(llm, token)
    else:
        _lib.enable(llm, token)
    config = EvictConfig(budget=40, window=8, policy=policy)
    assert config.cells == (72 if info.shares_heads else 40)
    sess = Session(llm, config)
    sess.decode(random_tokens(100, seed=41))
    sess.evict()
    held = _lib.stats(llm)["n_seq_cells"]
    assert held <= config.cells
    if info.shares_heads:
        assert held > 40, "the largest head share passes the per-head budget on this model"


@pytest.mark.parametrize("policy", list(POLICIES))
def test_value_norms_are_computed_only_for_a_rescale(llama_cpp, tiny_path, policy):
    llm = _llama(llama_cpp, tiny_path)
    sess = Session(llm, EvictConfig(budget=40, window=8, policy=policy))
    sess.decode(random_tokens(100, seed=42))
    sess.evict()
    assert (_lib.stats(llm)["value_norm_kernel"] != "none") == (POLICY_INFO[policy].rescale != "none")


@pytest.mark.parametrize("policy", [p for p, info in POLICY_INFO.items() if info.rescale != "none"])
def test_scores_without_the_norms_are_the_scores_with_them(llama_cpp, tiny_path, policy):
    """llama_kv_evict_scores with value_norm NULL: a policy that weighs by the norms computes them all the same."""
    llm = _llama(llama_cpp, tiny_path)
    sess = Session(llm, EvictConfig(budget=40, window=8, policy=policy))
    sess.decode(random_tokens(100, seed=43))
    n_kv = int(llama_cpp.llama_model_n_head_kv(llm._model.model))
    pos, score, norm = _lib.scores(llm, 1, n_kv)
    bare = _lib.scores(llm, 1, n_kv, value_norms=False)
    np.testing.assert_array_equal(bare[0], pos)
    np.testing.assert_array_equal(bare[1], score)
    assert bare[2] is None and norm.shape == score.shape


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=16, window=32), "budget \\(16\\) must be larger than window \\(32\\)"),
    (dict(pool_kernel=4), "pool_kernel must be odd"),
    (dict(ada_alpha=1.5), "ada_alpha must lie in"),
    (dict(n_sink=2000), "n_sink must be >= 0"),
])
def test_parameters_are_checked_before_a_model_loads(kwargs, message):
    config = EvictConfig(**kwargs)
    with pytest.raises(KVEvictError, match=message):
        config.validate()
    with pytest.raises(KVEvictError, match=message):
        config.cells
    EvictConfig().validate()


def test_policies_command_lists_each_policy_with_its_parts():
    r = CliRunner().invoke(main, ["policies"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()[1:]
    assert len(lines) == len(POLICIES)
    for line, p in zip(lines, POLICY_INFO.values()):
        share = f"{p.given_share:g}" if p.given_share else "-"
        assert line.split()[0] == p.name and line.split()[-4:] == [p.scorer, p.rescale, p.allocation, share]
    assert f"{DEFAULT_POLICY} (default)" in r.output and r.output.count("(default)") == 1


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("cells, window", [(1024, 32), (1023, 32), (40, 8)])
def test_for_cells_gives_the_largest_budget_that_holds_at_most_the_cells(policy, cells, window):
    # --kv-budget bounds the cells held for every policy: uniform shares keep it as the budget; shared heads keep
    # window + up to twice the per-head budget outside it, so their budget is floor((cells + window) / 2)
    config = EvictConfig.for_cells(cells, policy=policy, window=window)
    shared = POLICY_INFO[policy].shares_heads
    assert config.budget == ((cells + window) // 2 if shared else cells)
    assert config.cells <= cells
    assert EvictConfig(budget=config.budget + 1, policy=policy, window=window).cells > cells
    assert (config.policy, config.window) == (policy, window)


def test_for_cells_too_few_for_shared_heads_names_the_policy():
    # 4 sinks + window 8 need a per-head budget of 12: 16 cells for shared heads, 12 for uniform ones
    assert EvictConfig.for_cells(12, policy="criticalkv", window=8).budget == 12
    assert EvictConfig.for_cells(16, policy="defensivekv-layer", window=8).budget == 12
    with pytest.raises(KVEvictError, match="15 cells are too few for policy defensivekv-layer.*n_sink"):
        EvictConfig.for_cells(15, policy="defensivekv-layer", window=8)
