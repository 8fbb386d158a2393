"""Question texts that no list covers, as hypothesis strategies (the BM25, reader and HTTP property tests share them):
every script, combining marks, emoji, control and zero-width characters, runs of ASCII punctuation, and the words
tokenizers split differently from a regex (`a_b`, `x-y`, `O'Brien`, `3.14`, `C++`, `page_79.htm`, URLs, words past
tantivy's 40-byte limit), alone, mixed, and cut at a length limit."""

from __future__ import annotations

import string

from hypothesis import strategies as st

TRICKY = (
    "a_b",
    "x-y",
    "O'Brien",
    "3.14",
    "C++",
    "page_79.htm",
    "https://personal.math.ubc.ca/~cbm/aands/page_79.htm",
    "__init__",
    "numpy.ndarray.tolist()",
    "user@example.com",
    "#include",
    "AND",
    "OR NOT",
    '"unclosed',
    "field:title",
    "title:(a OR b)",
    "[1 TO 5]",
    "a~2",
    "b^3",
    "*",
    "\\",
    "e\u0301",  # e and a combining acute accent
    "ﬁ",
    "İstanbul",
    "ß",
    "東京都",
    "नमस्ते",
    "مرحبا",
    "Ελληνικά",
    "😀",
    "👩\u200d👩\u200d👧",
    "\u200b",  # zero-width space
    "\ufeff",
    "\x00",
    "\x1b[31m",
    "\t\n",
    "x" * 300,
)

# Any code point UTF-8 can carry (no lone surrogates: JSON carries those escaped, and the app refuses them).
UNICODE = st.characters(codec="utf-8")


def words() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(TRICKY),
        st.text(UNICODE, min_size=1, max_size=20),
        st.from_regex(r"[A-Za-z0-9]{1,10}(?:[_.\-'+/:@#~][A-Za-z0-9]{0,10}){1,4}", fullmatch=True),
        st.text(string.punctuation, min_size=1, max_size=12),
        st.text(string.ascii_letters, min_size=41, max_size=120),
    )


def questions(max_chars: int, ordinary: list[str] | None = None) -> st.SearchStrategy[str]:
    """Up to 12 words (of `words()`, and of `ordinary` when given) joined by spaces and cut to `max_chars`, or one
    word repeated to exactly `max_chars`."""
    pool = words() if not ordinary else st.one_of(words(), st.sampled_from(ordinary))
    joined = st.lists(pool, min_size=1, max_size=12).map(lambda ws: " ".join(ws)[:max_chars])
    at_limit = words().map(lambda w: ((w + " ") * max_chars)[:max_chars])
    return st.one_of(joined, joined, joined, at_limit)  # a quarter at the limit


def ascii_questions(vocabulary: list[str]) -> st.SearchStrategy[str]:
    """Questions of ASCII text only: words of `vocabulary` in any case, repeated, with punctuation between (what a
    word regex and tantivy's tokenizer split alike, underscores aside)."""
    word = st.one_of(
        st.sampled_from(vocabulary),
        st.sampled_from(vocabulary).map(str.upper),
        st.sampled_from(vocabulary).map(str.title),
        st.text(string.ascii_letters + string.digits, min_size=1, max_size=8),
    )
    glue = st.sampled_from([" ", "  ", ", ", "? ", "-", "'", " (", ") ", '"', ":", "/"])
    return st.lists(st.tuples(word, glue), min_size=1, max_size=10).map(lambda pairs: "".join(w + g for w, g in pairs))
