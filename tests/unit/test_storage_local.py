"""Storage on a local path: whole writes, manifests and their checks (the S3 API server's tests stay beside)."""

import time
from typing import Literal

import pytest

from pipeline.errors import PipelineError
from pipeline.store.manifests import FileEntry, Manifest
from pipeline.store.storage import Storage, sha256_hex


class NoteManifest(Manifest):
    kind: Literal["note"] = "note"
    note: str


def test_local_write_is_whole_and_leaves_no_temporaries(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    digest = storage.write_bytes("a/b/obj.bin", b"first")
    storage.write_bytes("a/b/obj.bin", b"second version")
    assert storage.read_bytes("a/b/obj.bin") == b"second version"
    assert digest == sha256_hex(b"first")
    assert storage.list_names("a/b") == ["obj.bin"]


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


def test_an_inventory_lists_every_object_with_its_size_and_age_and_a_batched_delete_leaves_no_empty_folder(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    for rel, data in {"a/x/1": b"1", "a/x/2": b"22", "a/y/3": b"333", "b/4": b"4444"}.items():
        storage.write_bytes(rel, data)
    listed = storage.inventory("a")
    assert [(o.rel, o.bytes) for o in listed] == [("a/x/1", 1), ("a/x/2", 2), ("a/y/3", 3)]
    assert all(abs(o.modified - time.time()) < 60 for o in listed) and storage.inventory("missing") == []
    storage.delete_many(["a/x/1", "a/x/2", "a/y/3"], batch=2)
    assert not (tmp_path / "root" / "a").exists() and storage.exists("b/4")  # emptied folders go, up to the root
