"""Per-token decode time of one policy after a 4,096-token prefill through 1,024 cells (SmolLM2-135M).

    PYLLMKV_LIB_DIR=BUILD/bin PYTHONPATH=REPO python ada_decode.py POLICY N_TOKENS DECODE_THREADS
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from decode_ab import licence_tokens  # noqa: E402

import pyllmkv  # noqa: E402
from pyllmkv import models  # noqa: E402
from pyllmkv.session import Session  # noqa: E402

policy, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
evict = pyllmkv.EvictConfig.for_cells(1024, policy=policy)
llm = pyllmkv.llama_cpp.Llama(model_path=str(models.smollm2()), n_ctx=evict.cells + 512, n_batch=512, n_ubatch=512,
                              n_threads=threads, n_threads_batch=2, verbose=False)
s = Session(llm, evict)
s.decode(licence_tokens(llm, 4096))
times = []
for _ in range(n):
    t0 = time.perf_counter()
    s.decode([11])
    times.append(time.perf_counter() - t0)
print(f"{policy} t{threads} median {statistics.median(times) * 1e3:.2f} ms/token, mean {statistics.mean(times) * 1e3:.2f}")
