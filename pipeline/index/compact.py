"""Compaction: segments past `index.max_segments` or `index.max_tombstone_fraction` are merged into one by copying
their codes list by list, tombstoned rows dropped; nothing is re-encoded or retrained."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import faiss
import numpy as np
import pyarrow as pa

from pipeline.index.build import Built
from pipeline.runtime.telemetry import PhaseTimer
from pipeline.store.blocks import BlockFile, BlockWriter, chunks_of, open_table
from pipeline.store.cache import fetch_verified
from pipeline.store.docstore import DOCSTORE_FILES, TOKENS_FILES
from pipeline.store.manifests import FileEntry
from pipeline.store.segments import (
    DOCSTORE_FILE,
    DOCSTORE_SCHEMA,
    IVF_FILE,
    KEYS_FILE,
    REFINE_FILES,
    SEGMENT_FILES,
    SQ8_FILE,
    TOKENS_FILE,
    LocalSegment,
    SegmentRef,
    VectorWriter,
    copy_live_codes,
    faiss_ids,
    finish_segment,
    ivf_of,
    open_rows,
    read_invlists,
    split_ids,
)
from pipeline.store.snapshots import read_npy_file
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)

CHUNK = 65536  # rows copied at a time: memory bounded whatever the segment's size


def copy_live(table: pa.Table | BlockFile, alive: np.ndarray, out: BlockWriter) -> None:
    """The rows of `table` where `alive`, appended to `out` chunk by chunk."""
    start = 0
    for chunk in chunks_of(table, CHUNK):
        out.write_table(chunk.filter(pa.array(alive[start : start + chunk.num_rows])))
        start += chunk.num_rows


def compact(
    storage: Storage, built: Built, merge: list[int], files: dict[str, FileEntry], work_dir: str, timer: PhaseTimer
) -> Built:
    """Merge the segments at positions `merge` into one and drop their tombstoned rows, copying codes (no vector is
    read or re-encoded); the other segments and their tombstones stay as they are."""
    kept = [s for i, s in enumerate(built.segments) if i not in merge]
    merged_seqs = {built.segments[i].seq for i in merge}
    built = replace(built, segments=[built.segments[i] for i in merge])
    with timer("compact"):
        paths = fetch_verified(
            storage,
            [
                files[s.file(n)]
                for s in built.segments
                if isinstance(s, SegmentRef)
                for n in SEGMENT_FILES
                if s.file(n) in files
            ],
            os.path.join(work_dir, "published"),
        )[0]
        local = {s.seq: s.paths for s in built.segments if isinstance(s, LocalSegment)}

        def path(segment, name: str) -> str | None:
            return local[segment.seq].get(name) if segment.seq in local else paths.get(segment.file(name))

        def first_path(segment, *names: str) -> str | None:
            """The segment's file of the first of `names` it has (block files, else the Arrow files before them)."""
            return next((found for name in names if (found := path(segment, name))), None)

        quantizer = faiss.read_index(
            built.quantizer
            if isinstance(built.quantizer, str)
            else fetch_verified(storage, [built.quantizer], os.path.join(work_dir, "published"))[0][
                built.quantizer.name
            ]
        )
        ivf = ivf_of(quantizer)
        seq = max(s.seq for s in [*kept, *built.segments]) + 1
        directory = os.path.join(work_dir, f"segment-{seq:06d}")
        os.makedirs(directory, exist_ok=True)
        remap, sources, keys, rows = {}, [], [], 0
        # The live rows' kept vectors (fp16, or sq8 codes: copied as they are) too, when every merged segment kept
        # them alike (refine stays possible).
        kept_as = next((n for n in REFINE_FILES if all(path(segment, n) for segment in built.segments)), None)
        dtype = np.uint8 if kept_as == SQ8_FILE else np.float16
        # (the vectors' own dimension: an OPQ rotation's output, the IVF's, can be smaller)
        vectors = VectorWriter(os.path.join(directory, kept_as), quantizer.d, dtype) if kept_as else None
        # And the live rows' token ids, when every merged segment has them (the reader tokenizes the others).
        tokens = [first_path(segment, *TOKENS_FILES) for segment in built.segments]
        token_tables = [open_table(p) for p in tokens] if all(tokens) else None
        token_out = BlockWriter(os.path.join(directory, TOKENS_FILE), token_tables[0].schema) if token_tables else None
        out = BlockWriter(os.path.join(directory, DOCSTORE_FILE), DOCSTORE_SCHEMA)
        for number, segment in enumerate(built.segments):
            alive = ~np.isin(faiss_ids(segment.seq, 0, segment.rows), built.dead)
            remap[segment.seq] = np.where(alive, rows + np.cumsum(alive) - 1, -1)
            rows += int(alive.sum())
            sources.append(read_invlists(path(segment, IVF_FILE)))
            docstore = open_table(first_path(segment, *DOCSTORE_FILES))
            copy_live(docstore, alive, out)
            if token_out is not None:
                copy_live(token_tables[number], alive, token_out)
            keys.append(read_npy_file(path(segment, KEYS_FILE), np.uint64, segment.name)[alive])
            if vectors is not None:
                where = f"segment {segment.seq}"
                stored = open_rows(path(segment, kept_as), segment.rows, quantizer.d, dtype, where)
                for start in range(0, segment.rows, CHUNK):  # bounded memory, whatever the segment's size
                    vectors.add(stored[start : start + CHUNK][alive[start : start + CHUNK]])
        out.close()
        if vectors is not None:
            vectors.close()
        if token_out is not None:
            token_out.close()
        merged = copy_live_codes(sources, remap, seq, ivf.nlist, ivf.code_size)
        segment = finish_segment(seq, rows, merged, keys, directory)
    dead_seqs, _ = split_ids(built.dead)
    log.info(
        "compacted %d segments (%d rows, %d dead) into %s (%d rows)",
        len(built.segments),
        built.stored,
        int(np.isin(dead_seqs, list(merged_seqs)).sum()),
        segment.name,
        rows,
    )
    return replace(
        built,
        segments=[*kept, segment],
        dead=built.dead[~np.isin(dead_seqs, list(merged_seqs))],
    )
