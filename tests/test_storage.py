from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.manifests import FileEntry, Manifest
from pipeline.storage import Storage, parquet_bytes, pyarrow_filesystem, read_parquet_bytes, sha256_hex


def test_local_write_is_whole_and_leaves_no_temporaries(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    digest = storage.write_bytes("a/b/obj.bin", b"first")
    storage.write_bytes("a/b/obj.bin", b"second version")
    assert storage.read_bytes("a/b/obj.bin") == b"second version"
    assert digest == sha256_hex(b"first")
    assert storage.list_names("a/b") == ["obj.bin"]


class NoteManifest(Manifest):
    kind: Literal["note"] = "note"
    note: str


def test_manifest_lists_checksums_and_refuses_tampering(tmp_path):
    storage = Storage(str(tmp_path))
    entry = FileEntry(name="part-0.bin", bytes=5, sha256=storage.write_bytes("d/part-0.bin", b"hello"), rows=1)
    assert storage.read_manifest("d", NoteManifest) is None
    storage.write_manifest("d", NoteManifest(files=[entry], note="x"))
    manifest = storage.read_manifest("d", NoteManifest)
    assert manifest.kind == "note" and manifest.rows == 1 and manifest.note == "x"
    assert storage.read_verified("d", manifest.files[0]) == b"hello"
    storage.write_bytes("d/part-0.bin", b"hellO")
    with pytest.raises(PipelineError, match="checksum mismatch"):
        storage.read_verified("d", manifest.files[0])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m.update(nte=m.pop("note")), "nte"),  # misspelt
        (lambda m: m.pop("note"), "note"),  # missing
        (lambda m: m["files"][0].update(sha265="0"), "sha265"),  # misspelt in a file entry
        (lambda m: m.update(kind="index"), "kind"),  # another kind of manifest
    ],
)
def test_a_misspelt_missing_or_foreign_field_is_an_error_naming_the_file(tmp_path, change, field):
    storage = Storage(str(tmp_path))
    entry = FileEntry(name="part-0.bin", bytes=5, sha256=storage.write_bytes("d/part-0.bin", b"hello"), rows=1)
    storage.write_manifest("d", NoteManifest(files=[entry], note="x"))
    value = storage.read_json("d/_manifest.json")
    change(value)
    storage.write_json("d/_manifest.json", value)
    with pytest.raises(PipelineError, match=rf"d/_manifest.json: unreadable manifest: (?s:.*){field}"):
        storage.read_manifest("d", NoteManifest)


def test_unreadable_manifest_is_an_error_not_a_missing_one(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_bytes("d/_manifest.json", b"{not json")
    with pytest.raises(PipelineError, match="unreadable manifest"):
        storage.read_manifest("d", NoteManifest)


def test_remove_unlisted_keeps_listed_parts(tmp_path):
    storage = Storage(str(tmp_path))
    for name in ("part-1", "part-2", "other"):
        storage.write_bytes(f"d/{name}", b"x")
    assert storage.remove_unlisted("d", keep={"part-1"}) == ["part-2"]
    assert storage.list_names("d") == ["other", "part-1"]


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
