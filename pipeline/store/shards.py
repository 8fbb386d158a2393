"""The shard formats between stages and their verified reads: passage shards (written by ingest) and embedding
shards (written by encode), Parquet objects that a manifest lists by size and sha256. Every read is checked against
its manifest entry first, and every failure names the shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import InputError, PipelineError, StorageError
from pipeline.store.manifests import FileEntry
from pipeline.store.storage import Storage, read_parquet_bytes

PASSAGE_SCHEMA = pa.schema(
    [("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("content_hash", pa.string())]
)
CONTENT_HASH = "blake2b-128(utf8(title) 0x1f utf8(text))"


def embedding_table(ids: list[str], content_hashes: list[str], vectors: np.ndarray, dtype: str) -> pa.Table:
    """id, content_hash (of the passage the vector was computed from, so a later snapshot can carry it over),
    embedding."""
    values = pa.array(np.ascontiguousarray(vectors, dtype=dtype).reshape(-1))
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "content_hash": pa.array(content_hashes, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(values, vectors.shape[1]),
        }
    )


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """[n, dim] view of an embedding shard's vectors (no copy for the flat values)."""
    column = table.column("embedding").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def read_shard(storage: Storage, directory: str, entry: FileEntry, max_bytes: int | None = None) -> pa.Table:
    """A Parquet shard a manifest lists, checked against its size and sha256; every failure names the shard."""
    url = storage.url(directory, entry.name)
    try:
        return read_parquet_bytes(storage.read_verified(directory, entry, max_bytes))
    except FileNotFoundError:
        raise InputError(url, None, "shard listed in the manifest is missing") from None
    except StorageError:
        raise
    except PipelineError as exc:
        raise InputError(url, None, str(exc).split(": ", 1)[-1]) from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(url, None, f"not a readable Parquet shard ({exc})") from None


def read_passage_shard(storage: Storage, directory: str, entry: FileEntry, max_bytes: int | None = None) -> pa.Table:
    """A passage shard, checked against its manifest entry and the passage schema; errors name the shard."""
    url = storage.url(directory, entry.name)
    table = read_shard(storage, directory, entry, max_bytes)
    if table.num_rows == 0:
        raise InputError(url, None, "shard has no rows")
    for field in PASSAGE_SCHEMA:
        if field.name not in table.column_names or table.schema.field(field.name).type != field.type:
            found = table.schema.field(field.name).type if field.name in table.column_names else "missing"
            raise InputError(url, None, f"column '{field.name}' must be {field.type} (found {found})")
    return table
