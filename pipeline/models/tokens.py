"""The reader's token ids of each passage, computed once when a segment is built (`pipeline.store.docstore` reads them):
tokenizing 100 passages per question costs a CPU core ~150 ms, longer than a GPU's forward pass over them. (Arrow
is imported where it is used: the reader imports this module on GPU machines that may lack it.)"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 4096  # rows tokenized at once


def fingerprint(tokenizer: Any) -> str:
    """What makes two tokenizers give the same ids: its serialized vocabulary, normalizer and pre-tokenizer."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


class ReaderTokenizer:
    """A reader model's (fast) tokenizer, applied to passages' titles and texts without special tokens, as the DPR
    reader tokenizer encodes them."""

    def __init__(self, model: str):
        from transformers import AutoTokenizer

        from pipeline.models.settings import resolve_model_path

        self.model = model
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model), use_fast=True)
        self.fingerprint = fingerprint(self.tokenizer)
        from pipeline.store.docstore import tokens_schema

        self.schema = tokens_schema(len(self.tokenizer))

    def table(self, passages):
        """title_ids and text_ids of each row of `passages` (an Arrow table of title, text), in row order; `CHUNK`
        rows at a time (the fast tokenizer's per-token objects for a whole shard take gigabytes)."""
        import pyarrow as pa

        parts = []
        for start in range(0, passages.num_rows, CHUNK):
            chunk = passages.slice(start, CHUNK)
            columns = {}
            for source, name in (("title", "title_ids"), ("text", "text_ids")):
                ids = self.tokenizer(chunk.column(source).to_pylist(), add_special_tokens=False)["input_ids"]
                columns[name] = pa.array(ids, self.schema.field(name).type)
            parts.append(pa.table(columns, schema=self.schema))
        return pa.concat_tables(parts) if parts else self.schema.empty_table()


def reader_tokenizer(model: str | None) -> ReaderTokenizer | None:
    """The reader's tokenizer for a build, None without a reader. One that cannot be loaded here (a hub name on an
    offline machine) leaves the version without token ids, which the reader then tokenizes itself: said, not
    fatal."""
    if model is None:
        return None
    try:
        return ReaderTokenizer(model)
    except (OSError, ValueError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("the reader's tokenizer %s cannot be loaded (%s): building without token ids", model, why)
        return None
