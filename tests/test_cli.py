"""`pyllmkv chat` driven as a user would: one-shot runs through click's CliRunner, the interactive chat through a
real pseudo-terminal; bad input gets a clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SUBPROCESS_CWD
from pyllmkv.cli import main


def _run(*args):
    return CliRunner().invoke(main, ["chat", *args], catch_exceptions=False)


def test_one_shot_answer_equals_llama_cpp_python_chat_completion(llama_cpp, smollm2_path):
    question = "Write one sentence about the sea."
    # by name, as `pyllmkv models` lists it: the same file the fixture fetched
    r = _run("smollm2-135m", "-p", question, "--temp", "0", "-n", "24", "--kv-budget", "256", "-b", "128")
    assert r.exit_code == 0, r.output
    stock = llama_cpp.Llama(model_path=smollm2_path, n_ctx=1024, verbose=False)
    expected = stock.create_chat_completion(messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0)
    assert r.stdout.strip() == expected["choices"][0]["message"]["content"].strip() != ""


# the default cache and policy (half of it kept by every token's surprisal), a q8_0 one with a head-wise policy
# (compaction moves its blocks; -fa auto turns flash attention on for it), and surprisal alone
@pytest.mark.parametrize("cache", [[], ["-ctk", "q8_0", "-ctv", "q8_0", "--policy", "defensivekv-layer"], ["--policy", "surprisal"]],
                         ids=["f16", "q8_0", "surprisal"])
def test_long_prompt_file_goes_through_a_small_budget(smollm2_path, tmp_path, cache):
    story = "The lighthouse keeper counted the ships that passed the rocky point each night. " * 120
    f = tmp_path / "long.txt"
    f.write_text(story + "\nIn one sentence, what did the keeper count?")
    r = _run(smollm2_path, "-f", str(f), "--temp", "0", "-n", "16", "--kv-budget", "256", "-b", "128", "--kv-stats", *cache)
    assert r.exit_code == 0, r.output
    m = re.search(r"\[kv\] cells (\d+) \(budget 256, allocated (\d+)\).*evictions (\d+)", r.stderr)
    assert m, r.stderr
    cells, allocated, evictions = map(int, m.groups())
    assert cells <= 256 + 128 and allocated <= 512 and evictions > 0


def _fails_with(args, message, code=None):
    r = _run(*args)
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    if code is not None:
        assert r.exit_code == code


def test_a_base_model_is_refused_for_chat_with_the_reason(gemma3_path):
    # the packaged Gemma 3 270M is the pretrained model: no chat template in its GGUF (test_models checks the listing)
    _fails_with(["gemma-3-270m", "-p", "hi", "--kv-budget", "256"], "a base model continues text and does not chat")


def test_missing_model_file(tmp_path):
    _fails_with([str(tmp_path / "nope.gguf"), "-p", "hi"], "does not exist")
    _fails_with(["qwen2.5-coder"], "or a model name (smollm2-135m, gemma-3-270m, qwen2.5-coder-1.5b;")


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 not a model")
    _fails_with([str(f), "-p", "hi"], "is not a GGUF file")


def test_truncated_gguf(smollm2_path, tmp_path):
    f = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as src:
        f.write_bytes(src.read(1 << 20))
    _fails_with([str(f), "-p", "hi"], "truncated")


@pytest.mark.parametrize("budget, message", [("0", "must be positive"), ("-5", "must be positive"), ("16", "must be larger than --window")])
def test_bad_budget(smollm2_path, budget, message):
    _fails_with([smollm2_path, "-p", "hi", "--kv-budget", budget], message)


@pytest.mark.parametrize("args, message", [
    (["--granularity", "token"], "granularity head, or with granularity token a policy of uniform allocation (such as criticalkv)"),
    (["--kv-budget", "39"], "39 cells are too few for policy defensivekv-layer"),
])
def test_a_shared_heads_policy_names_what_it_needs(smollm2_path, args, message):
    # defensivekv-layer shares cells among heads: token granularity, and fewer cells than window + 2 x 4 sinks, are
    # refused with the reason and the way out, and not in another flag's name
    shared = ["--policy", "defensivekv-layer"]
    _fails_with([smollm2_path, "-p", "hi", *shared, *args], message)
    assert "Invalid value for '--kv-budget'" not in _run(smollm2_path, "-p", "hi", *shared, "--granularity", "token").output


def test_quantized_v_without_flash_attention(smollm2_path):
    _fails_with([smollm2_path, "-p", "hi", "-ctv", "q8_0", "-fa", "off"], "needs flash attention in llama.cpp: use -fa on or auto")


def test_unknown_policy(smollm2_path):
    _fails_with([smollm2_path, "-p", "hi", "--policy", "lru"], "'lru' is not one of")


def test_even_pool_kernel(smollm2_path):
    _fails_with([smollm2_path, "-p", "hi", "--pool-kernel", "4"], "4 is not an odd number of cells")


def test_prompt_file_not_utf8(smollm2_path, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    _fails_with([smollm2_path, "-f", str(f)], "is not UTF-8 text")


def test_unsupported_architecture(tmp_path):
    from tinymodel import write_tiny_mamba

    _fails_with([write_tiny_mamba(tmp_path / "mamba.gguf"), "-p", "hi", "--kv-budget", "64", "-b", "64"], "recurrent")


class _Terminal:
    """The chat in a pseudo-terminal, as a person at a terminal sees it."""

    def __init__(self, args):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "pyllmkv", *args], stdin=slave, stdout=slave, stderr=slave,
                                     env=os.environ.copy(), close_fds=True, cwd=SUBPROCESS_CWD)
        os.close(slave)
        self.screen = ""

    def read_until(self, pattern, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.screen, re.S)
            if m:
                out, self.screen = self.screen[: m.end()], self.screen[m.end():]
                return out
            r, _, _ = select.select([self.master], [], [], 0.5)
            if r:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the program exited
                    break
                if not data:
                    break
                self.screen += data.decode("utf-8", "replace")
        raise AssertionError(f"did not see {pattern!r}; screen: {self.screen!r}")

    def type(self, text):
        os.write(self.master, text.encode())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)


def test_interactive_chat_two_turns_and_stats(smollm2_path):
    with _Terminal(["chat", smollm2_path, "--kv-budget", "64", "-b", "32", "--temp", "0", "-n", "48"]) as term:
        term.read_until(r"> ")
        term.type("Tell me a short story about a cat.\n")
        first = term.read_until(r"\n> ")
        term.type("Now tell me one about a dog.\n")
        second = term.read_until(r"\n> ")
        assert len(first.strip()) > 20 and len(second.strip()) > 20
        term.type("/stats\n")
        stats = term.read_until(r"\n> ")
        m = re.search(r"evictions (\d+)", stats)
        assert m and int(m.group(1)) > 0, stats
        term.type("\x04")  # Ctrl-D
        assert term.proc.wait(timeout=30) == 0


def test_ctrl_c_stops_the_answer_not_the_program(smollm2_path):
    # greedy SmolLM2 repeats itself rather than stopping: 4,000 tokens take far longer than the signal needs
    with _Terminal(["chat", smollm2_path, "--kv-budget", "256", "-b", "64", "--temp", "0", "-n", "4000"]) as term:
        term.read_until(r"> ")
        term.type("Write a very long essay about the history of ships.\n")
        term.read_until(r"ships\.\r?\n")  # the terminal's echo of the line; the answer's words come after it
        term.read_until(r"\w+ \w+ \w+")
        term.proc.send_signal(signal.SIGINT)
        term.read_until(r"\[stopped\]\s*\n> ", timeout=60)
        term.type("/stats\n")
        assert "[kv] cells" in term.read_until(r"\n> ")
        term.type("\x04")
        assert term.proc.wait(timeout=30) == 0


def test_ctrl_c_during_a_long_prefill_leaves_the_chat_usable(smollm2_path):
    # a long message through a 64-cell cache in 16-token batches: the prefill bar shows, Ctrl-C stops it, and the
    # next question is answered from a consistent cache (the stopped turn is dropped)
    with _Terminal(["chat", smollm2_path, "--kv-budget", "64", "-b", "16", "--temp", "0", "-n", "24"]) as term:
        term.read_until(r"> ")
        term.type(("The harbour master counted the boats that came in before the storm. " * 55)[:4000] + "\n")
        term.read_until(r"prefill \[")
        term.proc.send_signal(signal.SIGINT)
        term.read_until(r"\[stopped\]\s*\n> ", timeout=60)
        term.type("What is the capital of France?\n")
        answer = term.read_until(r"\n> ").split("\n", 1)[1]
        assert len(answer.strip(" >\r\n")) > 10, answer  # (what is left of the system prompt after 55 evictions varies)
        term.type("/stats\n")
        m = re.search(r"cells (\d+)", term.read_until(r"\n> "))
        assert m and int(m.group(1)) <= 64 + 16
        term.type("\x04")
        assert term.proc.wait(timeout=30) == 0


def test_threads_flag_sets_generation_and_prompt_threads(llama_cpp, smollm2_path):
    # llama.cpp's -t sets both; llama-cpp-python's n_threads alone leaves prompt processing at its own default
    from pyllmkv.cli import load
    sess = load(Path(smollm2_path), 256, "criticalkv", "head", 32, 13, True, 128, 0, "f16", "f16", "auto", 1, -1)
    assert sess.llm.context_params.n_threads == 1 and sess.llm.context_params.n_threads_batch == 1
    assert sess.config.renumber  # the default: on, SmolLM2's cache can shift positions
    sess = load(Path(smollm2_path), 256, "criticalkv", "head", 32, 13, True, 128, 0, "f16", "f16", "auto", 1, -1,
                renumber=False)
    assert not sess.config.renumber


def test_repack_reaches_the_model_loader(smollm2_path, monkeypatch):
    # --repack (chat's load) and repack=True (pyllmkv.Llama): llama.cpp's repacked layouts with W_O overridden to the
    # plain buffer type (tests/test_kernels.py reads the layout from llama.cpp's load log); by default neither
    import pyllmkv
    from pyllmkv import _lib
    from pyllmkv.cli import load
    seen, init = [], _lib._model_init
    monkeypatch.setattr(_lib, "_model_init", lambda self, **kw: seen.append(
        (kw["params"].use_extra_bufts, bool(kw["params"].tensor_buft_overrides))) or init(self, **kw))
    for repack in (False, True):
        load(Path(smollm2_path), 256, "criticalkv", "head", 32, 13, True, 128, 0, "f16", "f16", "auto", 1, -1,
             repack=repack)
        pyllmkv.Llama(smollm2_path, kv_budget=256, n_batch=128, repack=repack, verbose=False)
    assert seen == [(False, False)] * 2 + [(True, True)] * 2


def test_ctx_size_caps_the_conversation_as_serve_does(smollm2_path):
    # -c means what it means to serve (and pyllmkv.Llama's n_ctx): the most tokens a conversation holds, not the cells
    from pyllmkv.chat import Chat, ConversationFull, Sampler
    from pyllmkv.cli import load

    r = _run(smollm2_path, "-p", "word " * 100, "-c", "50", "--kv-budget", "64", "-b", "32")
    assert r.exit_code == 1 and "more than -c 50" in r.output, r.output

    def answer(n_ctx, max_tokens):
        sess = load(Path(smollm2_path), 64, "criticalkv", "head", 32, 13, True, 32, 0, "f16", "f16", "auto", 2, 0)
        chat = Chat(sess, Sampler(temp=0), n_ctx=n_ctx)
        return chat, "".join(chat.send("Write a long story about a lighthouse.", max_tokens=max_tokens))

    capped, text = answer(60, -1)
    n_prompt = len(capped.history) - len(capped.llm.tokenize(text.encode(), add_bos=False))
    assert len(capped.history) == 60 and capped.full and 0 < n_prompt < 60
    assert text == answer(0, 60 - n_prompt)[1]  # the same answer as without a cap, cut where the cap falls
    with pytest.raises(ConversationFull, match="more than -c 60"):
        list(capped.send("And another one."))
    assert capped.messages[-1]["role"] == "assistant"  # the refused message is not part of the conversation
