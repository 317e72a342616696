"""A llama-server process on 127.0.0.1 for the tests and benches of `pyllmkv serve --parallel` (pyllmkv/parallel.py)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from pyllmkv import parallel
from pyllmkv._lib import EvictConfig


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A llama-server process on 127.0.0.1 (also one `pyllmkv serve --parallel` became), its log in a file, stopped on
    exit."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        """Waits until the server at port answers /health."""
        self.proc, self.port, self.log_path = proc, port, log
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline:
                self.stop()
                raise TimeoutError(f"llama-server did not answer /health:\n{self.log()[-3000:]}")
            time.sleep(0.3)

    @classmethod
    def start(cls, binary: Path, model: str, config: Optional[EvictConfig], n_parallel: int, log: Path, n_batch: int,
              n_ctx: int, extra: Sequence[str] = ()) -> "Server":
        """llama-server with n_parallel slots, each within config's cells (None: no eviction, stock behaviour); n_ctx:
        cells of all slots (with config the hook raises it to what the slots need)."""
        port = free_port()
        argv, env = parallel.command(model, config, n_parallel, n_batch, "127.0.0.1", port, ["-c", str(n_ctx), *extra],
                                     server=binary)
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        return cls(proc, port, log)

    def post(self, path: str, body: dict) -> dict:
        """The JSON answer; an error answer as {"error": {...}}."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return {"error": json.loads(e.read())["error"]}

    def complete(self, prompt: str, n_predict: int, cache_prompt: bool = False) -> dict:
        """/completion at temperature 0."""
        return self.post("/completion", {"prompt": prompt, "n_predict": n_predict, "temperature": 0,
                                         "cache_prompt": cache_prompt})

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def evictions(self) -> list[tuple[int, int, int]]:
        """(seq, cells before, cells after) of each eviction the hook logged."""
        return [tuple(map(int, m)) for m in re.findall(r"kv_evict: seq (\d+): (\d+) -> (\d+) cells", self.log())]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
