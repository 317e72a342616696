"""scripts/gap_chat.py: its scorer (keys given their own number, in the two shapes the model answers in), and its oracle
(each fact's sentence held whole in every head), read from the cache itself."""

import pyllmkv
from gap_chat import FACT, document, find, holders, kept, oracle
from pyllmkv.chat import Chat, Sampler
from pyllmkv.session import Session

FACTS = {"marble": "8922960", "copper": "7368886", "violin": "4522457"}


def test_a_key_takes_the_first_number_after_it():
    assert kept("- Marble: 8922960\n- Copper: 7368886\n- Violin: 4522457", FACTS) == 3
    assert kept("- Marble: 7368886\n- Copper: 8922960\n- Violin: 4522457", FACTS) == 1  # two swapped
    assert kept("- Marble: 8922960\n- Violin: 4522457", FACTS) == 2  # one key left out
    assert kept("- Marble: 89229601\n- Copper: 7368886", FACTS) == 1  # eight digits are not the number


def test_a_list_of_keys_then_numbers_pairs_them_in_order():
    answer = "The numbers for marble, copper, and violin are 8922960, 4522457, and 4522457 respectively."
    assert kept(answer, FACTS) == 2
    assert kept("The numbers for marble, copper, and violin are 1, 2, and 3.", FACTS) == 0
    assert kept("I do not know.", FACTS) == 0


def test_the_oracle_holds_every_fact_sentence_whole_where_the_default_does_not(smollm2_path):
    vocab = pyllmkv.llama_cpp.Llama(model_path=smollm2_path, vocab_only=True, verbose=False)
    tokenize = lambda t: vocab.tokenize(t.encode(), add_bos=False, special=False)  # noqa: E731
    doc, facts = document(tokenize, 2000, 3, seed=0)
    sentences = [tokenize(FACT.format(key=k, value=v)) for k, v in facts.items()]
    whole = {}
    for told in (False, True):
        config = pyllmkv.EvictConfig.for_cells(256, policy="defensivekv-surprisal")
        llm = pyllmkv.llama_cpp.Llama(model_path=smollm2_path, n_ctx=config.cells + 512, n_batch=256, n_ubatch=256,
                                      verbose=False)
        session = oracle(Session(llm, config), facts, tokenize) if told else Session(llm, config)
        chat = Chat(session, Sampler(temp=0))
        "".join(chat.send(f"Read this document.\n\n{doc}", max_tokens=1))
        assert pyllmkv._lib.stats(session.ctx)["n_evictions"] > 0
        count, n_heads = holders(session.ctx)
        whole[told] = [all(count[find(chat.history, run) + i] == n_heads for i in range(len(run))) for run in sentences]
        llm.close()
    assert whole[True] == [True] * len(sentences)
    assert not all(whole[False])  # what the oracle adds: the default, at 256 cells, drops words of some sentence
