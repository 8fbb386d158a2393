"""The 64-bit keys that join passages, tombstones, embeddings and index segments without reading text: a leaf
module (numpy and hashlib only), so every stage computes them the same way.

A passage id's key is the first 8 bytes of its BLAKE2b hash; ingest refuses a corpus in which two ids share one.
A content key is the first 8 bytes of a row's content hash.
"""

from __future__ import annotations

import hashlib

import numpy as np


def id_hash(passage_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(passage_id.encode("utf-8"), digest_size=8).digest(), "little")


def keys_of(ids: list[str]) -> np.ndarray:
    """64-bit keys of passage ids (uint64)."""
    return np.fromiter((id_hash(i) for i in ids), np.uint64, len(ids))


def content_keys(content_hashes: list[str]) -> np.ndarray:
    """64-bit keys of content hashes (their first 8 bytes), uint64."""
    return np.fromiter((int(h[:16], 16) for h in content_hashes), np.uint64, len(content_hashes))
