"""The README as a user reads it: its Python snippet runs as written, every relative link in it and in docs/ leads to a
file of this repository, and every measured number in the README links to the run that made it."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_python_snippet_runs(smollm2_path):
    snippet = re.search(r"## In Python.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "README.md", "exec"), {})
    assert "'enabled': True" in out.getvalue() and out.getvalue().split("{")[0].strip() != ""


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_exist(doc):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    missing = [t for t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"



# a measurement: a percentage, a speed, a size, a time, a ratio such as 0.92x, or a decimal such as a perplexity (not a
# version or an address: 0.3.36, 192.168.1.2)
MEASURED = re.compile(r"\d(?:[\d,]*\.?\d*)\s*(?:%|tok/s|MiB|GiB|MB|ms\b|s\b)|\d\.\d+x\b|(?<![\w.-])\d+\.\d+(?![\w.])")
RUN_LINK = re.compile(r"\]\((docs/bench/[^)#\s]+)\)")


def unlinked_numbers(readme: str) -> list[str]:
    """Measured numbers of the README that no run link follows within their sentence (for a sentence that introduces
    a table, within the paragraph after the table), with the text they stand in."""
    text = re.sub(r"```.*?```", "", readme, flags=re.S)
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
    found = []
    for i, block in enumerate(blocks):
        # arXiv ids and other links' targets are no measurements
        block = re.sub(r"arXiv \d+\.\d+", "arXiv", re.sub(r"\]\((?!docs/bench/)[^)]*\)", "]", block))
        if block.startswith(("#", "|")):
            continue
        sentences = re.split(r"(?<=\.)\s+(?=[A-Z*(\[])", block)
        for j, sentence in enumerate(sentences):
            if j == len(sentences) - 1 and block.endswith(":") and i + 2 < len(blocks) and blocks[i + 1].startswith("|"):
                sentence += " " + blocks[i + 2]
            links = list(RUN_LINK.finditer(sentence))
            tail = sentence[links[-1].end():] if links else sentence
            if MEASURED.search(tail):
                found.append(f"{MEASURED.findall(tail)[:3]} in: {' '.join(tail.split())[:140]}")
    return found


def test_every_measured_number_in_the_readme_links_to_its_run():
    readme = (ROOT / "README.md").read_text()
    missing = unlinked_numbers(readme)
    assert not missing, "README numbers with no run linked after them in their sentence:\n" + "\n".join(missing)
    # the check can fail: a number whose link is taken away is found
    mutated = readme.replace("([run](docs/bench/smollm2-135m-ppl-32k/results.md))", "")
    assert mutated != readme and any("291.75" in m for m in unlinked_numbers(mutated))
