"""The bench's text and its pass-key needle.

The text is real English prose that a package ships: the licences of Debian's base-files package
(/usr/share/common-licenses, on every Debian and Ubuntu system), about 300 KB, 65k SmolLM2 tokens; any other text
file can stand in (`pyllmkv bench --text FILE`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

LICENCES = Path("/usr/share/common-licenses")
# in this order; the symlinks there (GPL -> GPL-3 ...) are left out so no text comes twice
LICENCE_FILES = ["GPL-3", "GPL-2", "LGPL-2.1", "LGPL-3", "Apache-2.0", "Artistic", "MPL-2.0", "MPL-1.1", "GFDL-1.3",
                 "GFDL-1.2", "CC0-1.0", "GPL-1", "LGPL-2", "BSD"]

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


def text(path: Optional[Path] = None) -> tuple[str, str]:
    """(text, where it came from): `path`, else the licences of Debian's base-files package."""
    if path is not None:
        return Path(path).read_text(errors="replace"), str(path)
    files = [LICENCES / name for name in LICENCE_FILES if (LICENCES / name).is_file()]
    if not files:
        raise FileNotFoundError(f"no text to read: {LICENCES} (Debian's base-files) is missing here; pass --text FILE "
                                "with a long English text")
    return "\n\n".join(f.read_text(errors="replace") for f in files), f"Debian base-files {LICENCES}: " + ", ".join(f.name for f in files)


def needle_prompt(tokenize, hay: list[int], context: int, depth: float, key: str) -> list[int]:
    """Tokens of a prompt of `context` tokens: the intro, the haystack with the needle at `depth` (0 = right after the
    intro, 1 = right before the question) and the question. `tokenize(text, bos)` gives tokens; `hay` is the
    tokenized text (it must be long enough)."""
    intro, needle, question = tokenize(INTRO, True), tokenize(NEEDLE.format(key=key), False), tokenize(QUESTION, False)
    n_hay = context - len(intro) - len(needle) - len(question)
    if n_hay < 0 or n_hay > len(hay):
        raise ValueError(f"a {context}-token needle prompt needs {n_hay} tokens of text; the text has {len(hay)}")
    at = round(depth * n_hay)
    return intro + hay[:at] + needle + hay[at:n_hay] + question


def found(answer: str, key: str) -> bool:
    """Exact match: the first number in the answer is the key."""
    m = re.search(r"\d+", answer)
    return m is not None and m.group(0) == key
