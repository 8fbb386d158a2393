"""Real text for the model benchmarks (`benchmarks/gpu.py`, `benchmarks/reader.py`): passages and questions cut
from the demo corpus. Nothing here needs Ray or FAISS, so it runs where `benchmarks/gpu.py` does."""

from __future__ import annotations

import numpy as np


def real_passages(count: int) -> tuple[list[str], list[str]]:
    """Titles and texts of real 100-word passages (the demo corpus, cut from Python's documentation), repeated."""
    from pipeline.demo_corpus import passages

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
