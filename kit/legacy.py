"""Index files as the release before wrote them, to test that versions built then still serve."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import tantivy


def format1_bm25(directory: Path, rows: Iterable[tuple[str, str, str]]) -> dict[str, str]:
    """A BM25 index of `lexical_format` 1 (id, title and text stored and indexed raw, the body with positions) of
    (id, title, text) rows in `directory`: its files, name → path."""
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("key", tokenizer_name="raw", index_option="basic")
    for name in ("id", "title", "text"):
        builder.add_text_field(name, stored=True, tokenizer_name="raw", index_option="basic")
    builder.add_text_field("body", tokenizer_name="en_stem")
    directory.mkdir(parents=True)
    index = tantivy.Index(builder.build(), path=str(directory))
    writer = index.writer(heap_size=50_000_000, num_threads=1)
    for pid, title, text in rows:
        writer.add_document(tantivy.Document(key=pid, id=pid, title=title, text=text, body=f"{title} {text}"))
    writer.commit()
    writer.wait_merging_threads()
    return {p.name: str(p) for p in directory.iterdir() if not p.name.endswith(".lock")}
