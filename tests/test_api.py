"""pyllmkv.Llama behaves as llama_cpp.Llama, with the cache bounded by the budget."""

from __future__ import annotations

import numpy as np
import pytest

import pyllmkv
from pyllmkv import KVEvictError


def _stock(llama_cpp, path, n_ctx):
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=128, n_ubatch=128, n_threads=2, verbose=False, seed=7)


def _budgeted(path, budget, **kw):
    return pyllmkv.Llama(path, kv_budget=budget, n_batch=128, n_threads=2, verbose=False, seed=7, **kw)


def test_completion_identical_to_llama_cpp_python_within_budget(llama_cpp, smollm2_path):
    prompt = "Q: Name three colours of the rainbow.\nA:"
    stock = _stock(llama_cpp, smollm2_path, 1024)
    ours = _budgeted(smollm2_path, 896)
    for temp in (0.0, 0.8):
        a = stock(prompt, max_tokens=40, temperature=temp, seed=11)["choices"][0]["text"]
        b = ours(prompt, max_tokens=40, temperature=temp, seed=11)["choices"][0]["text"]
        assert a == b and a.strip()
    stats = ours.kv_stats()
    assert stats["enabled"] and stats["n_evictions"] == 0


def test_chat_longer_than_budget_keeps_answering_in_bounded_cache(smollm2_path):
    budget, n_batch = 128, 128
    llm = _budgeted(smollm2_path, budget)
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in one sentence."}]
    cells = []
    for question in ["What is the capital of France?", "What is water made of?", "Why is the sky blue?",
                     "What do bees make?", "How many legs does a spider have?", "What is the largest planet?"]:
        messages.append({"role": "user", "content": question})
        out = llm.create_chat_completion(messages=messages, max_tokens=48, temperature=0.0)
        answer = out["choices"][0]["message"]["content"]
        assert answer.strip()
        messages.append({"role": "assistant", "content": answer})
        cells.append(llm.kv_stats()["n_seq_cells"])
    stats = llm.kv_stats()
    assert stats["n_evictions"] > 0
    assert max(cells) <= budget + n_batch
    assert llm.n_tokens > budget + n_batch  # the conversation outgrew the cache


def test_streaming_chat_completion(smollm2_path):
    llm = _budgeted(smollm2_path, 256)
    chunks = list(llm.create_chat_completion(
        messages=[{"role": "user", "content": "Count from one to five."}], max_tokens=24, temperature=0.0, stream=True,
    ))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_prompt_longer_than_cache_is_prefilled_in_chunks(smollm2_path):
    budget = 256
    llm = _budgeted(smollm2_path, budget)
    text = "The river flows past the old mill and under the stone bridge. " * 60
    prompt = text + "\nQuestion: what flows under the bridge?\nAnswer:"
    n_prompt = len(llm.tokenize(prompt.encode()))
    assert n_prompt > 3 * budget
    out = llm(prompt, max_tokens=8, temperature=0.0)
    assert out["usage"]["prompt_tokens"] == n_prompt
    assert llm.kv_stats()["n_seq_cells"] <= budget + 128


def test_tokenize_detokenize_unchanged(llama_cpp, smollm2_path):
    ours = _budgeted(smollm2_path, 256)
    stock = llama_cpp.Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    text = "Hello, wörld! 123"
    assert ours.tokenize(text.encode()) == stock.tokenize(text.encode())
    assert ours.detokenize(ours.tokenize(text.encode(), add_bos=False)).decode() == text


def test_unknown_policy_fails_before_loading(smollm2_path):
    with pytest.raises(ValueError, match="unknown policy 'lru'"):
        pyllmkv.Llama(smollm2_path, kv_budget=256, policy="lru", verbose=False)


def test_pool_kernel_is_the_one_the_session_evicts_with(llama_cpp, tiny_path):
    # pyllmkv.Llama(pool_kernel=k) keeps the cells a Session with EvictConfig(pool_kernel=k) keeps (whose pooling
    # test_hook checks against numpy), and the kernel changes them
    from conftest import held_positions, random_tokens
    from pyllmkv._lib import EvictConfig
    from pyllmkv.session import Session
    from tinymodel import TinyRef

    ref, tokens, held = TinyRef(tiny_path), random_tokens(150, seed=60), {}
    for k in (1, 9):
        llm = pyllmkv.Llama(tiny_path, kv_budget=40, window=8, n_batch=32, pool_kernel=k, policy=EvictConfig.policy,
                            verbose=False, type_k=0, type_v=0)
        llm.eval(tokens)
        plain = llama_cpp.Llama(model_path=tiny_path, n_ctx=72, n_batch=32, n_ubatch=32, type_k=0, type_v=0, verbose=False)
        Session(plain, EvictConfig.for_cells(40, window=8, pool_kernel=k)).decode(tokens)
        held[k] = held_positions(llm, ref)
        np.testing.assert_array_equal(held[k], held_positions(plain, ref))
    assert held[1].shape != held[9].shape or (held[1] != held[9]).any()  # shared heads: the cell count may differ too
    with pytest.raises(KVEvictError, match="pool_kernel must be odd"):
        pyllmkv.Llama(tiny_path, kv_budget=40, pool_kernel=4, verbose=False)


def test_budget_below_window_is_refused(smollm2_path):
    with pytest.raises(KVEvictError, match="larger than window"):
        pyllmkv.Llama(smollm2_path, kv_budget=16, window=32, verbose=False)


def test_prompt_diverging_inside_the_evicted_part_is_answered(smollm2_path):
    budget = 128
    llm = _budgeted(smollm2_path, budget)
    story = "The baker opened the shop at dawn and sold bread to the fishermen. " * 20
    first = llm(story + "Question: who bought the bread? Answer:", max_tokens=8, temperature=0.0)
    assert llm.kv_stats()["n_evictions"] > 0
    # shares the first ~100 tokens, most of them evicted by now, then goes elsewhere
    second_prompt = story[:400] + "Then the baker closed the shop.\nQuestion: what did the baker do last? Answer:"
    second = llm(second_prompt, max_tokens=8, temperature=0.0)
    assert first["usage"]["completion_tokens"] > 0 and second["usage"]["completion_tokens"] > 0
    n_prompt = len(llm.tokenize(second_prompt.encode()))
    assert second["usage"]["prompt_tokens"] == n_prompt
    assert list(llm.input_ids[:n_prompt]) == llm.tokenize(second_prompt.encode())
    assert llm.kv_stats()["n_seq_cells"] <= budget + 128


def test_renumber_answers_a_follow_up_from_consecutive_positions(smollm2_path):
    # renumber=True: the answer's first token, after the prompt's evictions, reads the kept cells renumbered from 0,
    # and a follow-up that extends the conversation goes on from the renumbered positions
    llm = _budgeted(smollm2_path, 128, renumber=True)
    story = "The baker opened the shop at dawn and sold bread to the fishermen. " * 20 + "Question: who bought the bread? Answer:"
    first = llm(story, max_tokens=8, temperature=0.0)
    assert llm.kv_stats()["n_evictions"] > 0
    held = pyllmkv._lib.positions(llm._ctx.ctx)
    np.testing.assert_array_equal(held, np.arange(len(held)))
    follow_up = story + first["choices"][0]["text"] + "\nQuestion: when did the shop open? Answer:"
    second = llm(follow_up, max_tokens=8, temperature=0.0)
    assert second["choices"][0]["text"].strip()
    assert pyllmkv._lib.positions(llm._ctx.ctx)[-1] < 128 + 128 + 8 < second["usage"]["prompt_tokens"]


def test_renumber_is_on_by_default_where_the_cache_can_shift(smollm2_path, gemma3_path):
    # renumber=None: SmolLM2's cache shifts positions, so the answer reads the kept cells renumbered from 0; Gemma 3's
    # sliding-window cache smaller than its full one (swa_full off) cannot, so it evicts and answers without
    story = "The baker opened the shop at dawn and sold bread to the fishermen. " * 20 + "Question: who bought the bread? Answer:"
    for renumber in (None, False):
        llm = _budgeted(smollm2_path, 128, renumber=renumber)
        llm(story, max_tokens=4, temperature=0.0)
        held = pyllmkv._lib.positions(llm._ctx.ctx)
        assert llm.kv_stats()["n_evictions"] > 0
        assert llm.evict_config.renumber == (renumber is None) == (held[-1] == len(held) - 1)
    story = story * 5
    gemma = _budgeted(gemma3_path, 1024, swa_full=False)
    assert not gemma.evict_config.renumber
    assert gemma(story, max_tokens=4, temperature=0.0)["usage"]["completion_tokens"] > 0
    assert gemma.kv_stats()["n_evictions"] > 0
    with pytest.raises(ValueError, match="cannot shift them"):
        _budgeted(gemma3_path, 1024, swa_full=False, renumber=True)


def test_chat_after_renumbering_decodes_only_what_changed(llama_cpp, smollm2_path):
    # past max_position the session renumbers positions, while the chat's history counts tokens: a prompt that
    # diverges from the history near its end is decoded from there, not from the (much smaller) next position
    from pyllmkv.chat import Chat, Sampler
    from pyllmkv.session import Session

    config = pyllmkv.EvictConfig.for_cells(128, window=32)
    llm = llama_cpp.Llama(model_path=smollm2_path, n_ctx=config.cells + 128, n_batch=128, n_ubatch=128, n_threads=2,
                          verbose=False)
    sess = Session(llm, config, max_position=256)
    chat = Chat(sess, Sampler(temp=0), system="You are a helpful assistant who answers in one sentence. " * 20)
    for question in ["What is the capital of France?", "What is water made of?", "Why is the sky blue?"]:
        assert "".join(chat.send(question, max_tokens=32)).strip()
    shift = len(chat.history) - sess.n_past
    assert shift > 100
    decoded = []
    decode = sess.decode
    sess.decode = lambda tokens, **kw: decoded.append(len(tokens)) or decode(tokens, **kw)
    chat.messages[-1]["content"] = chat.messages[-1]["content"][:-8] + "..."  # as a template might render it otherwise
    assert "".join(chat.send("And the smallest?", max_tokens=8)).strip()
    assert decoded[0] < 40 and sum(decoded) < shift, decoded
    assert sess.n_tokens == len(chat.history) and sess.n_past <= 256


@pytest.mark.parametrize("policy", ["criticalkv", "criticalkv-ada"])
def test_prompt_cache_resumes_as_the_live_cache(llama_cpp, smollm2_path, policy):
    # llama-cpp-python's prompt cache (pyllmkv serve --cache) saves a state after each completion and loads the one
    # with the longest shared prefix: with the hook's data in the state, a conversation resumed from the cache, past
    # evictions, answers as the one whose cache stayed live
    budget = 128
    first = "The baker opened the shop at dawn and sold bread to the fishermen. " * 25 + "Question: who bought the bread? Answer:"
    live, cached = _budgeted(smollm2_path, budget, policy=policy), _budgeted(smollm2_path, budget, policy=policy)
    cached.set_cache(llama_cpp.LlamaRAMCache())
    loads = []
    load_state = cached.load_state
    cached.load_state = lambda state: (loads.append(state.n_tokens), load_state(state))
    answer = live(first, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    assert cached(first, max_tokens=16, temperature=0.0)["choices"][0]["text"] == answer
    cached("Something else: the weather today is", max_tokens=8, temperature=0.0)  # its cells now hold another prompt
    second = first + answer + "\nQuestion: when did the shop open? Answer:"
    expected = live(second, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    got = cached(second, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    assert loads and loads[-1] > budget, "the second prompt was not resumed from a state past the budget"
    assert live.kv_stats()["n_evictions"] > 0 and cached.kv_stats()["n_evictions"] > 0
    assert got == expected




def test_too_long_prompt_names_the_logical_context(smollm2_path):
    """llama-cpp-python's own message named the cache's cells (its server answered "maximum context length is 768"
    for a model whose limit was 8,192): the limit is the logical context, and the message says so."""
    llm = pyllmkv.Llama(smollm2_path, kv_budget=64, n_batch=256, n_ctx=2000, verbose=False)
    cells = pyllmkv.llama_cpp.llama_n_ctx(llm.ctx)
    assert cells < 2000
    prompt = " ".join(["word"] * 2100)
    with pytest.raises(ValueError, match=rf"Requested tokens \(\d+\) exceed context window of 2000 \(n_ctx.*holds {cells} cells"):
        llm.create_completion(prompt, max_tokens=4)
    # the server's formatter reads the logical context from it
    from llama_cpp.server.errors import RouteErrorHandler

    try:
        llm.create_completion(prompt, max_tokens=4)
    except ValueError as e:
        pattern = next(p for p in RouteErrorHandler.pattern_and_formatters if p.search(str(e)))
        assert pattern.search(str(e)).group(2) == "2000"
