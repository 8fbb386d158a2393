"""An offline demo corpus in DPR's psgs_w100 layout, cut from documentation that ships with Python.

Articles are the language reference topics (`pydoc_data.topics`) and the docstrings of common standard-library
modules; each is split into 100-word passages titled by its topic, as DPR split Wikipedia. Real text, no download.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import pydoc_data.topics
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Modules that libraries imported by the pipeline do not patch (torch replaces inspect.getfile, for one), so the
# corpus is the same whatever ran first.
MODULES = (
    "argparse",
    "array",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "math",
    "operator",
    "os",
    "pathlib",
    "queue",
    "random",
    "re",
    "secrets",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "typing",
    "unittest",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
    "zlib",
)
WORDS_PER_PASSAGE = 100


def articles() -> Iterator[tuple[str, str]]:
    """(title, text) pairs in a fixed order."""
    for topic, text in sorted(pydoc_data.topics.topics.items()):
        yield topic.replace("-", " "), text
    for name in MODULES:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        for member_name, member in sorted(vars(module).items()):
            if member_name.startswith("_") or not (inspect.isfunction(member) or inspect.isclass(member)):
                continue
            if getattr(member, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(member)
            if doc:
                parts.append(f"{member_name}: {doc}")
        yield f"{name} module", "\n".join(parts)


def passages(max_passages: int | None = None) -> Iterator[tuple[str, str, str]]:
    """(id, text, title) rows: consecutive 100-word windows of each article, ids numbered from 1 like DPR."""
    count = 0
    for title, text in articles():
        words = text.split()
        for start in range(0, len(words), WORDS_PER_PASSAGE):
            if max_passages is not None and count >= max_passages:
                return
            count += 1
            yield str(count), " ".join(words[start : start + WORDS_PER_PASSAGE]), title


def write_demo_corpus(path: str | Path, max_passages: int | None = None) -> int:
    """Write the corpus as psgs_w100 does (`id<TAB>"text"<TAB>title`, inner quotes doubled); returns rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = 0
    with opener(path, "wt", encoding="utf-8", newline="") as out:
        out.write("id\ttext\ttitle\n")
        for pid, text, title in passages(max_passages):
            quoted = '"' + text.replace('"', '""') + '"'
            out.write(f"{pid}\t{quoted}\t{title}\n")
            rows += 1
    return rows


def real_passages(count: int) -> tuple[list[str], list[str]]:
    """Titles and texts of `count` real 100-word passages (this corpus, repeated as needed), for the model
    benchmarks (`benchmarks/gpu.py`, `benchmarks/reader.py`), which run where only this package is importable."""
    rows = list(passages())
    rows = [rows[i % len(rows)] for i in range(count)]
    return [title for _, _, title in rows], [text for _, text, _ in rows]


def word_questions(count: int, seed: int = 2) -> list[str]:
    """`count` questions of 6 to 14 consecutive words of the real passages, with a question mark."""
    _, texts = real_passages(200)
    words = " ".join(texts).split()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        start = int(rng.integers(0, len(words) - 16))
        out.append(" ".join(words[start : start + int(rng.integers(6, 15))]) + "?")
    return out
