"""`pyllmkv chat`: talk to a GGUF model for as long as you like in a KV cache of fixed size."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import click

from . import options as o


@click.command()
@o.model_options
@click.option("-n", "--n-predict", "n_predict", type=int, default=-1, show_default=True, help="max tokens per answer (-1: until the model stops)")
@click.option("--temp", type=float, default=0.8, show_default=True)
@click.option("-p", "--prompt", type=str, default=None, help="answer this one prompt and exit")
@click.option("-f", "--file", "prompt_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None, help="read the prompt from a file (any length) and exit")
@click.option("-sys", "--system-prompt", "system", type=str, default=None)
@click.option("--kv-stats", is_flag=True, help="print cache statistics after each answer")
def chat(n_predict, temp, prompt, prompt_file, system, kv_stats, n_ctx, **load_args):
    """Chat with MODEL (a .gguf path or a name from `pyllmkv models`; default: qwen2.5-coder-1.5b, fetched once) in a KV
    cache of --kv-budget cells.

    In the chat: /stats shows the cache, /reset starts over, Ctrl-C stops an answer, Ctrl-D or /exit quits."""
    from ..chat import Chat, ConversationFull, Sampler

    session = o.load(**load_args)
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise click.ClickException(f"{prompt_file} is not UTF-8 text ({e.reason} at byte {e.start}): convert it with iconv")
    try:
        conversation = Chat(session, Sampler(temp=temp, seed=load_args["seed"]), system=system, n_ctx=n_ctx)
    except ValueError as e:
        raise click.ClickException(str(e))

    def answer(text: str) -> None:
        # Ctrl-C only raises a flag, checked between tokens and batches: a KeyboardInterrupt raised while llama.cpp
        # calls back into Python (its log callback) would be swallowed by ctypes
        stop = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
        bar = _PrefillProgress()

        def on_prefill(done, total):
            bar.update(done, total)
            if stop:
                raise KeyboardInterrupt

        answer_pieces = conversation.send(text, max_tokens=n_predict, on_prefill=on_prefill)
        try:
            for piece in answer_pieces:
                bar.close()
                click.echo(piece, nl=False)
                sys.stdout.flush()
                if stop:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            answer_pieces.close()  # keeps the partial answer in the conversation
            click.echo(" [stopped]", nl=False)
        except ConversationFull as e:
            if prompt is not None:
                raise click.ClickException(str(e))
            click.echo(f"[{e}]", nl=False, err=True)
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()
        if conversation.full:
            click.echo(f" [the conversation holds -c {n_ctx} tokens: /reset to start over]", nl=False, err=True)
        click.echo()
        if kv_stats:
            click.echo(_stats_line(session), err=True)

    if prompt is not None:
        answer(prompt)
        return

    click.echo("pyllmkv chat: /stats, /reset, /exit; Ctrl-C stops an answer, Ctrl-D quits.", err=True)
    while True:
        try:
            text = input("> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        text = text.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/stats":
            click.echo(_stats_line(session))
            continue
        if text == "/reset":
            conversation.reset()
            click.echo("[conversation reset]")
            continue
        answer(text)



def _stats_line(session) -> str:
    from .. import _lib

    st = _lib.stats(session.ctx)
    return (f"[kv] cells {st['n_seq_cells']} (budget {session.config.cells}, allocated {st['kv_size']}), "
            f"KV {st['kv_bytes'] / 2**20:.1f} MiB, evictions {st['n_evictions']} ({st['n_evicted']} cells, "
            f"{st['t_evict_us'] / 1e3:.0f} ms), position {session.n_past}")



class _PrefillProgress:
    """A progress bar on stderr for prefills that take more than a second."""

    def __init__(self):
        self.t0 = time.time()
        self.shown = False

    def update(self, n_done: int, n_total: int) -> None:
        if n_done >= n_total and not self.shown:
            return
        if self.shown or time.time() - self.t0 > 1.0:
            self.shown = True
            width = 30
            fill = int(width * n_done / max(n_total, 1))
            click.echo(f"\rprefill [{'#' * fill}{'.' * (width - fill)}] {n_done}/{n_total} tokens", nl=False, err=True)

    def close(self) -> None:
        if self.shown:
            click.echo("\r" + " " * 70 + "\r", nl=False, err=True)
            self.shown = False
