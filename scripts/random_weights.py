#!/usr/bin/env python3
"""A model of the same architecture, shapes, tensor types and tokenizer as a real GGUF, with random weights: for speed
runs on a machine the real weights cannot reach (the GPU machine: no package index, 64 MiB carried). Speed and memory
depend on the shapes and types, not on the values; answers do not, so such a model is never used for quality.

  random_weights.py head MODEL.gguf HEAD      the header alone (metadata, tokenizer, tensor table): a few MiB
  random_weights.py fill HEAD OUT.gguf LIB    the header, then every tensor filled with normal(0, 0.02) values
                                              (norm weights 1, biases 0), quantized to its type by ggml_quantize_chunk
                                              of LIB (a libggml-base of any build of the pinned llama.cpp)
"""

from __future__ import annotations

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def head(model: str, out: str) -> None:
    from gguf import GGUFReader

    with open(model, "rb") as f, open(out, "wb") as g:
        g.write(f.read(GGUFReader(model).data_offset))


def fill(header: str, out: str, lib: str) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    ggml = ctypes.CDLL(lib)
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_void_p]
    ggml.ggml_quantize_init.argtypes = [ctypes.c_int]
    with open(header, "rb") as f, open(out, "wb") as g:
        g.write(f.read())
        # room for any tensor table: the reader maps the file, and what it says of the data is rewritten below
        g.truncate(g.tell() + (64 << 30))
    reader = GGUFReader(out)
    end = max(t.data_offset + int(t.n_bytes) for t in reader.tensors)
    tensors = [(t.name, GGMLQuantizationType(int(t.tensor_type)), [int(n) for n in t.shape], t.data_offset, int(t.n_bytes))
               for t in reader.tensors]
    del reader
    os.truncate(out, end)

    for qtype in {t[1] for t in tensors}:
        ggml.ggml_quantize_init(int(qtype))  # not thread-safe: before the pool
    # (tensor, first row, rows): pieces of at most ~4M values, so a large embedding is quantized on every core
    pieces = []
    for i, (_, _, shape, _, _) in enumerate(tensors):
        n_rows = int(np.prod(shape)) // shape[0]
        step = max(1, (4 << 20) // shape[0])
        pieces += [(i, r, min(step, n_rows - r)) for r in range(0, n_rows, step)]

    def write(piece) -> None:
        i, row, n_rows = piece
        name, qtype, shape, offset, n_bytes = tensors[i]
        n_per_row = shape[0]
        row_bytes = n_bytes // (int(np.prod(shape)) // n_per_row)
        if name.endswith("_norm.weight"):
            x = np.ones(n_rows * n_per_row, np.float32)
        elif name.endswith(".bias"):
            x = np.zeros(n_rows * n_per_row, np.float32)
        else:
            x = np.random.default_rng((i, row)).standard_normal(n_rows * n_per_row, np.float32) * np.float32(0.02)
        if qtype == GGMLQuantizationType.F32:
            data = x.tobytes()
        elif qtype == GGMLQuantizationType.F16:
            data = x.astype(np.float16).tobytes()
        else:
            buf = ctypes.create_string_buffer(n_rows * row_bytes)
            written = ggml.ggml_quantize_chunk(int(qtype), x.ctypes.data, buf, 0, n_rows, n_per_row, None)
            if written != n_rows * row_bytes:
                raise RuntimeError(f"{name}: {written} bytes quantized to {qtype.name}, the table says {n_rows * row_bytes}")
            data = buf.raw
        with open(out, "r+b") as g:
            g.seek(offset + row * row_bytes)
            g.write(data)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, pieces))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "head":
        head(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "fill":
        fill(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
