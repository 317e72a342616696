"""scripts/gap_chat.py: its scorer (keys given their own number, in the two shapes the model answers in), and its oracle
(each fact's sentence held whole in every head), read from the cache itself."""

import pyllmkv
from gap_chat import converse, document, holders, oracle, paired, table, whole
from pyllmkv.chat import Chat, Sampler
from pyllmkv.session import Session

FACTS = {"marble": "8922960", "copper": "7368886", "violin": "4522457"}


def test_a_key_takes_the_first_number_after_it():
    assert paired("- Marble: 8922960\n- Copper: 7368886\n- Violin: 4522457", FACTS) == ["marble", "copper", "violin"]
    assert paired("- Marble: 7368886\n- Copper: 8922960\n- Violin: 4522457", FACTS) == ["violin"]  # two swapped
    assert paired("- Marble: 8922960\n- Violin: 4522457", FACTS) == ["marble", "violin"]  # one key left out
    assert paired("- Marble: 89229601\n- Copper: 7368886", FACTS) == ["copper"]  # eight digits are not the number


def test_a_list_of_keys_then_numbers_pairs_them_in_order():
    answer = "The numbers for marble, copper, and violin are 8922960, 4522457, and 4522457 respectively."
    assert paired(answer, FACTS) == ["marble", "violin"]
    assert paired("The numbers for marble, copper, and violin are 1, 2, and 3.", FACTS) == []
    assert paired("I do not know.", FACTS) == []


def test_the_oracle_holds_every_fact_sentence_whole_where_the_default_does_not(smollm2_path):
    vocab = pyllmkv.llama_cpp.Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    tokenize = lambda t: vocab.tokenize(t.encode(), add_bos=False, special=False)  # noqa: E731
    doc, facts = document(tokenize, 2000, 3, seed=0)
    held_whole = {}
    for told in (False, True):
        config = pyllmkv.EvictConfig.for_cells(256, policy="defensivekv-surprisal")
        llm = pyllmkv.llama_cpp.Llama(model_path=smollm2_path, n_ctx=config.cells + 512, n_batch=256, n_ubatch=256,
                                      verbose=False)
        session = oracle(Session(llm, config), facts, tokenize) if told else Session(llm, config)
        chat = Chat(session, Sampler(temp=0))
        "".join(chat.send(f"Read this document.\n\n{doc}", max_tokens=1))
        assert pyllmkv._lib.stats(session.ctx)["n_evictions"] > 0
        count, n_heads = holders(session.ctx)
        held_whole[told] = whole(count, n_heads, chat.history, facts, tokenize)
        llm.close()
    assert held_whole[True] == dict.fromkeys(facts, True)
    # what the oracle adds: the default, at 256 cells, drops words of some sentence
    assert not all(held_whole[False].values())


def test_a_renumbering_session_asks_for_the_facts_at_positions_within_its_cells(smollm2_path):
    vocab = pyllmkv.llama_cpp.Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    tokenize = lambda t: vocab.tokenize(t.encode(), add_bos=False, special=False)  # noqa: E731
    doc, facts = document(tokenize, 2000, 3, seed=0)
    config = pyllmkv.EvictConfig.for_cells(256, policy="defensivekv-surprisal", renumber=True)
    llm = pyllmkv.llama_cpp.Llama(model_path=smollm2_path, n_ctx=config.cells + 512, n_batch=256, n_ubatch=256,
                                  verbose=False)
    session = oracle(Session(llm, config), facts, tokenize)
    row = converse(session, doc, facts, tokenize, vocab.detokenize)
    # the later turns went on from the cells kept, not from the ~2,100 tokens read
    assert row["renumbered"] and row["tokens"] > 2000
    assert pyllmkv._lib.positions(session.ctx).max() < config.cells + 512
    # what the cache held of the facts was read before the renumbering: the oracle's sentences, whole
    assert row["whole"] == dict.fromkeys(facts, True)
    llm.close()


def test_the_table_tells_keys_the_cache_lost_from_keys_the_model_misread():
    answer = "- Marble: 8922960\n- Copper: 4522457\n- Violin: 7368886"  # copper and violin swapped
    rows = [{"policy": "full", "cells": 900, "facts": FACTS, "turns": [answer]},
            {"policy": "p", "kv_budget": 64, "facts": FACTS, "turns": [answer],
             "whole": {"marble": True, "copper": True, "violin": False}},
            {"policy": "old", "kv_budget": 64, "facts": FACTS, "turns": [answer]}]
    lines = table(rows).splitlines()
    assert lines[2] == "| full | 900 | 1 | 1/3 | 3/3 | 2 |"
    assert lines[3] == "| p | 64 | 1 | 1/3 | 2/3 | 1 |"  # copper held whole and misread; violin's sentence broken
    assert lines[4] == "| old | 64 | 1 | 1/3 | - | - |"  # a run from before the whole-sentence count
