"""pytest plugin for llama-cpp-python's own tests, loaded by tests/test_upstream.py in a child pytest
(`-p upstream_peer`) with its settings as JSON in $PYLLMKV_PEER:
- "llama": arguments that override the tests' own: llama_cpp.Llama becomes pyllmkv.Llama with them;
- "models": "repo_id/filename" -> local path, what huggingface_hub.hf_hub_download returns (there is no network);
- "deselect": {test id: why not applicable}; "refused": {test id: why}, tests that must fail with KVEvictError;
- "report": where to write {test id: {"outcome", "decoded", "evicted"}} at the end of the session ("decoded": an
  object with eviction on decoded in the test; "evicted": one evicted).
"""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

import pyllmkv  # binds llama_cpp to the patched library before the upstream tests import llama_cpp

PEER = json.loads(os.environ["PYLLMKV_PEER"])
REPORT: dict[str, dict] = {}
_current = {"test": ""}


def _entry(test: str) -> dict:
    return REPORT.setdefault(test, {"outcome": None, "decoded": False, "evicted": False})


def hf_hub_download(repo_id: str, filename: str, **kwargs) -> str:
    try:
        return PEER["models"][f"{repo_id}/{filename}"]
    except KeyError:
        raise FileNotFoundError(f"no local stand-in for {repo_id}/{filename} (and no network)") from None


class PeerLlama(pyllmkv.Llama):
    def __init__(self, model_path: str, **kwargs):
        super().__init__(model_path, **{**kwargs, **PEER["llama"]})

    def eval(self, tokens):
        super().eval(tokens)
        stats = self.kv_stats()
        if stats["enabled"]:
            entry = _entry(_current["test"])
            entry["decoded"] = True
            entry["evicted"] |= stats["n_evictions"] > 0


# the upstream tests import huggingface_hub, which pyllmkv does not need: a module of our own serves either way
sys.modules["huggingface_hub"] = types.ModuleType("huggingface_hub")
sys.modules["huggingface_hub"].hf_hub_download = hf_hub_download
pyllmkv.llama_cpp.Llama = PeerLlama


def pytest_collection_modifyitems(config, items):
    # an id that names no test would leave the test it meant running, or hide a renamed one: refuse
    missing = (PEER["deselect"].keys() | PEER["refused"].keys()) - {item.nodeid for item in items}
    if missing:
        raise pytest.UsageError(f"not in the upstream suite: {sorted(missing)}")
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid in PEER["deselect"]])
    items[:] = [item for item in items if item.nodeid not in PEER["deselect"]]
    for item in items:
        if item.nodeid in PEER["refused"]:
            item.add_marker(pytest.mark.xfail(raises=pyllmkv.KVEvictError, strict=True,
                                              reason=PEER["refused"][item.nodeid]))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _current["test"] = item.nodeid


def pytest_runtest_logreport(report):
    # the call's outcome, unless setup or teardown failed
    if report.when == "call" or report.outcome != "passed":
        _entry(report.nodeid)["outcome"] = "xfailed" if hasattr(report, "wasxfail") else report.outcome


def pytest_sessionfinish(session):
    with open(PEER["report"], "w") as f:
        json.dump(REPORT, f, indent=1)
