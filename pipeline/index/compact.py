"""Compaction: segments past `index.max_segments` or `index.max_tombstone_fraction` are merged into one by copying
their codes list by list, tombstoned rows dropped; nothing is re-encoded or retrained."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import faiss
import numpy as np
import pyarrow as pa

from pipeline.cache import fetch_verified
from pipeline.docstore import open_arrow
from pipeline.index.build import Built
from pipeline.manifests import FileEntry
from pipeline.segments import (
    DOCSTORE_FILE,
    DOCSTORE_SCHEMA,
    IVF_FILE,
    KEYS_FILE,
    SEGMENT_FILES,
    TOKENS_FILE,
    VECTORS_FILE,
    LocalSegment,
    SegmentRef,
    VectorWriter,
    copy_live_codes,
    faiss_ids,
    finish_segment,
    ivf_of,
    open_vectors,
    read_invlists,
    split_ids,
)
from pipeline.snapshots import read_npy_file
from pipeline.storage import Storage
from pipeline.telemetry import PhaseTimer

log = logging.getLogger(__name__)


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
        # The live rows' vectors are copied too, when every merged segment kept them (refine stays possible).
        with_vectors = all(path(segment, VECTORS_FILE) for segment in built.segments)
        vectors = VectorWriter(os.path.join(directory, VECTORS_FILE), ivf.d) if with_vectors else None
        # And the live rows' token ids, when every merged segment has them (the reader tokenizes the others).
        tokens = [path(segment, TOKENS_FILE) for segment in built.segments]
        token_tables = [open_arrow(p) for p in tokens] if all(tokens) else None
        token_out = (
            pa.ipc.new_file(os.path.join(directory, TOKENS_FILE), token_tables[0].schema) if token_tables else None
        )
        with (
            pa.OSFile(os.path.join(directory, DOCSTORE_FILE), "wb") as sink,
            pa.ipc.new_file(sink, DOCSTORE_SCHEMA) as out,
        ):
            for segment in built.segments:
                alive = ~np.isin(faiss_ids(segment.seq, 0, segment.rows), built.dead)
                remap[segment.seq] = np.where(alive, rows + np.cumsum(alive) - 1, -1)
                rows += int(alive.sum())
                sources.append(read_invlists(path(segment, IVF_FILE)))
                docstore = pa.ipc.open_file(pa.memory_map(path(segment, DOCSTORE_FILE), "r")).read_all()
                out.write_table(docstore.filter(pa.array(alive)))
                if token_out is not None:
                    token_out.write_table(token_tables[built.segments.index(segment)].filter(pa.array(alive)))
                keys.append(read_npy_file(path(segment, KEYS_FILE), np.uint64, segment.name)[alive])
                if vectors is not None:
                    stored = open_vectors(path(segment, VECTORS_FILE), segment.rows, ivf.d, f"segment {segment.seq}")
                    for start in range(0, segment.rows, 65536):  # bounded memory, whatever the segment's size
                        vectors.add(stored[start : start + 65536][alive[start : start + 65536]])
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
