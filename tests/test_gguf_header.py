"""pyllmkv's GGUF header reader against gguf-py's full reader (the oracle), and its errors on bad files."""

from __future__ import annotations

import gguf
import pytest

from pyllmkv.session import gguf_metadata, gguf_model_int, sliding_window


def gguf_py_scalars(path: str) -> dict:
    """Every scalar and string field as gguf-py reads it (arrays left out, as gguf_metadata leaves them)."""
    out = {}
    for key, field in gguf.GGUFReader(path).fields.items():
        if key.startswith("GGUF.") or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        out[key] = bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value[0].item()
    return out


@pytest.mark.parametrize("model", ["tiny_path", "smollm2_path", "gemma3_path"])
def test_metadata_equals_gguf_py(model, request):
    path = request.getfixturevalue(model)
    expected = gguf_py_scalars(path)
    got = gguf_metadata(path)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value) if isinstance(value, float) else got[key] == value, key


def test_model_ints(smollm2_path, gemma3_path):
    assert gguf_model_int(smollm2_path, "context_length") == 8192
    assert sliding_window(smollm2_path) == 0
    assert sliding_window(gemma3_path) == 512


def test_not_gguf_and_truncated(tmp_path, smollm2_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        gguf_metadata(str(text))
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(4096))
    with pytest.raises(ValueError, match="ends early"):
        gguf_metadata(str(cut))
