"""pyllmkv.Llama where there is nothing to evict: it behaves as llama_cpp.Llama on the same model, or says why not."""

from __future__ import annotations

import pytest

import pyllmkv
from pyllmkv import KVEvictError

TEXTS = ["Hello, wörld! 123", "The river flows past the old mill and under the stone bridge."]


def test_vocab_only_tokenizes_as_llama_cpp(llama_cpp, smollm2_path):
    ours = pyllmkv.Llama(smollm2_path, vocab_only=True, verbose=False)
    stock = llama_cpp.Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    for text in TEXTS:
        tokens = stock.tokenize(text.encode())
        assert ours.tokenize(text.encode()) == tokens
        assert ours.detokenize(tokens) == stock.detokenize(tokens)
    stats = ours.kv_stats()
    assert stats["enabled"] is False and "vocab_only" in stats["reason"]


def test_embedding_gives_llama_cpp_vectors(llama_cpp, smollm2_path):
    ours = pyllmkv.Llama(smollm2_path, embedding=True, n_threads=2, verbose=False)
    stock = llama_cpp.Llama(model_path=smollm2_path, embedding=True, n_threads=2, verbose=False)
    assert ours.embed("hello") == stock.embed("hello")
    assert ours.embed(TEXTS, normalize=True) == stock.embed(TEXTS, normalize=True)
    assert ours.create_embedding(TEXTS[1])["data"] == stock.create_embedding(TEXTS[1])["data"]
    stats = ours.kv_stats()
    assert stats["enabled"] is False and "embedding=True" in stats["reason"]


def test_recurrent_model_is_refused_naming_the_architecture_and_the_alternative(llama_cpp, tmp_path):
    from tinymodel import write_tiny_mamba

    path = write_tiny_mamba(tmp_path / "mamba.gguf")
    with pytest.raises(KVEvictError, match=r"architecture mamba.*use llama_cpp\.Llama"):
        pyllmkv.Llama(path, kv_budget=64, n_batch=64, verbose=False)
    # the alternative the message names loads and decodes the model
    stock = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=64, verbose=False)
    stock.eval([1, 2, 3])
    assert stock.n_tokens == 3
