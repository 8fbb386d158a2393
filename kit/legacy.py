"""Index files as the release before wrote them, to test that versions built then still serve."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import tantivy

from pipeline.store.blocks import open_table
from pipeline.store.cache import fetch_verified
from pipeline.store.docstore import ARROW_DOCSTORE_FILE, ARROW_TOKENS_FILE, DOCSTORE_FILE, TOKENS_FILE
from pipeline.store.layout import read_index_manifest
from pipeline.store.segments import SQ8_FILE, VECTORS_FILE, Sq8, Sq8Vectors, segments_of, upload_once
from pipeline.store.storage import Storage


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


def before_blocks(storage: Storage, version: str, work: Path) -> str:
    """Version `version` republished as `<version>-arrow` in the files of the release before block files and sq8
    codes: each segment's docstore and token ids as uncompressed Arrow IPC files, its kept vectors as fp16 (decoded
    from the sq8 codes), no `sq8` quantizer; the same passages, inverted lists and BM25 index. Returns its name."""
    manifest = read_index_manifest(storage, version)
    paths, _ = fetch_verified(storage, manifest.files, str(work / "fetched"))
    sq8 = Sq8.read(paths[manifest.sq8], manifest.dim, manifest.sq8) if manifest.sq8 else None
    replaced = {}
    for segment in segments_of(manifest):
        for new, old in ((DOCSTORE_FILE, ARROW_DOCSTORE_FILE), (TOKENS_FILE, ARROW_TOKENS_FILE), (SQ8_FILE, None)):
            if segment.file(new) not in paths:
                continue
            local = work / "old" / segment.name / (old or VECTORS_FILE)
            local.parent.mkdir(parents=True, exist_ok=True)
            if old is None:
                codes = Sq8Vectors(np.load(paths[segment.file(new)], allow_pickle=False), sq8)
                np.save(local, codes[np.arange(segment.rows)].astype(np.float16), allow_pickle=False)
            else:
                table = open_table(paths[segment.file(new)]).read_all()
                with pa.ipc.new_file(str(local), table.schema) as out:
                    out.write_table(table)
            entry, _ = upload_once(storage, str(local), posixpath.join(segment.name, local.name))
            replaced[segment.file(new)] = entry
    files = [replaced.get(e.name, e) for e in manifest.files if e.name != manifest.sq8]
    old = manifest.model_copy(update={"version": f"{version}-arrow", "files": files, "sq8": None})
    storage.write_manifest(f"indexes/{old.version}", old, name="manifest.json")
    return old.version
