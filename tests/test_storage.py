"""Storage on the S3 API server, and racing writers on both backends (local-only checks: tests/unit)."""

from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.store.manifests import FileEntry, Manifest
from pipeline.store.storage import Storage, parquet_bytes, pyarrow_filesystem, read_parquet_bytes


class NoteManifest(Manifest):
    kind: Literal["note"] = "note"
    note: str


def test_s3_roundtrip_and_pyarrow_filesystem(s3_endpoint, s3_bucket, s3_client):
    options = {"endpoint_url": s3_endpoint}
    storage = Storage(f"s3://{s3_bucket}/prefix", options)
    assert storage.url("x", "y") == f"s3://{s3_bucket}/prefix/x/y"
    data = parquet_bytes(pa.table({"id": ["a", "b"]}))
    storage.write_bytes("t/part-0.parquet", data)
    listed = s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["prefix/t/part-0.parquet"]
    filesystem, path = pyarrow_filesystem(storage.url("t"), options)
    table = pq.read_table(f"{path}/part-0.parquet", filesystem=filesystem, use_threads=False)
    assert table.column("id").to_pylist() == ["a", "b"]
    assert read_parquet_bytes(storage.read_bytes("t/part-0.parquet")).num_rows == 2
    assert storage.list_names("missing") == []


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_only_one_of_racing_writers_creates_an_object(backend, tmp_path, request):
    """The conditional write that keeps two nightly runs from publishing one index version twice."""
    from concurrent.futures import ThreadPoolExecutor

    if backend == "s3":
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
        storage = Storage(f"s3://{bucket}/root", {"endpoint_url": endpoint})
    else:
        storage = Storage(str(tmp_path / "root"))
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: storage.create_exclusive("v/manifest.json", f"writer {i}".encode()), range(8)))
    assert won.count(True) == 1
    assert storage.read_bytes("v/manifest.json") == f"writer {won.index(True)}".encode()
    assert storage.list_names("v") == ["manifest.json"]  # no temporaries left behind
    manifest = NoteManifest(files=[FileEntry(name="index.faiss", bytes=1, sha256="0" * 64)], note="first")
    assert storage.write_manifest("w", manifest, name="manifest.json", exclusive=True) is not None
    assert storage.write_manifest("w", manifest, name="manifest.json", exclusive=True) is None
