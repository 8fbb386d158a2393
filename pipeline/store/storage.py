"""Object storage behind one interface: local paths, s3://, gs://, file:// through fsspec.

Writes are whole-object (a temporary name then an atomic rename locally, a single PUT or a completed multipart
upload on object stores), so a reader never sees half an object. A directory's `_manifest.json` is written last,
lists every object with its sha256, and is the only thing readers trust: objects it does not list do not exist.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import PipelineError, StorageError
from pipeline.store.manifests import FileEntry, Manifest

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
M = TypeVar("M", bound=Manifest)
try:
    from botocore.exceptions import BotoCoreError, ClientError

    _BOTO_ERRORS: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
except ImportError:  # local or gs:// only
    _BOTO_ERRORS = ()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


S3_RETRIES = {"max_attempts": 8, "mode": "standard"}  # 5xx, throttling and dropped connections, with backoff


def resolve(url: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and protocol-less path for any URL or plain path. S3 requests are retried with exponential
    backoff (`S3_RETRIES`, unless `storage.options.config_kwargs.retries` says otherwise)."""
    options = dict(options or {})
    if url.startswith(("s3://", "s3a://")):
        config_kwargs = dict(options.get("config_kwargs") or {})
        config_kwargs.setdefault("retries", S3_RETRIES)
        options["config_kwargs"] = config_kwargs
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path.rstrip("/") or path


def pyarrow_filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem (for Parquet) with the same options as `resolve`."""
    fs, path = resolve(url, options)
    if isinstance(fs, LocalFileSystem):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialize a table as one Parquet object (zstd), ready for a whole-object write."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_parquet_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """Parse a Parquet object held in memory.

    Single-threaded on purpose: pyarrow pool threads that still touch Python-owned buffers when the interpreter
    exits abort it ("terminate called without an active exception", exit 134), seen with pyarrow 25 and 26.
    """
    return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)


@dataclass(frozen=True)
class StoredObject:
    """An object as a listing gives it: its path under `storage.root`, size and last modification (epoch s)."""

    rel: str
    bytes: int
    modified: float


def _modified(info: dict[str, Any]) -> float:
    """A listing's modification time: `mtime` locally, `LastModified` on S3, `updated` on GCS."""
    for key in ("mtime", "LastModified", "updated", "last_modified"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
        if isinstance(value, str):
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    raise PipelineError(f"{info.get('name')}: the store gives no modification time ({sorted(info)})")


class Storage:
    """Everything a job writes lives under `storage.root`; this class owns that tree."""

    def __init__(self, root: str, options: dict[str, Any] | None = None):
        self.options = dict(options or {})
        self.fs, self.root_path = resolve(root, self.options)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root_url = self.root_path if self.is_local else f"{protocol}://{self.root_path}"

    # -- naming -------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root_path, *parts)

    def url(self, *parts: str) -> str:
        return posixpath.join(self.root_url, *parts)

    # -- objects ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _naming(self, action: str, rel: str):
        """A storage failure that outlived the retries says which object and what was being done."""
        try:
            yield
        except (FileNotFoundError, FileExistsError, PipelineError):
            raise
        except (OSError, *_BOTO_ERRORS) as exc:
            raise StorageError(
                f"{self.url(rel)}: {action} failed after retries with backoff ({type(exc).__name__}: {exc})"
            ) from None

    def _replace_local(self, target: str, write) -> None:
        """Local whole-object write: `write(temporary)` fills a temporary file, then one atomic rename."""
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            write(temporary)
            self.fs.mv(temporary, target)
        finally:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write one object whole and return its sha256."""
        target = self.path(rel)
        with self._naming("write", rel):
            if self.is_local:
                self._replace_local(target, lambda temporary: self.fs.pipe_file(temporary, data))
            else:
                self.fs.pipe_file(target, data)
        return sha256_hex(data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write an object only if none exists under that name; False when another writer got there first.

        One atomic step on both backends: a hard link of a complete temporary file locally, a conditional PUT
        (`If-None-Match: *`) on S3. Other object stores fall back to check-then-write (not atomic)."""
        target = self.path(rel)
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            temporary = f"{target}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(temporary, data)
            try:
                os.link(temporary, target)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(temporary)
        if "s3" in self.fs.protocol:
            try:
                self.fs.pipe_file(target, data, mode="create")
                return True
            except FileExistsError:
                return False
            except (OSError, *_BOTO_ERRORS) as exc:  # a 412 PreconditionFailed may surface as a plain OSError
                if "PreconditionFailed" in str(exc) or "412" in str(exc):
                    return False
                with self._naming("conditional write", rel):
                    raise
        if self.fs.exists(target):
            return False
        self.fs.pipe_file(target, data)
        return True

    def upload(self, local_path: str, rel: str) -> None:
        """Copy a local file in whole (rename locally; one PUT or a completed multipart upload on object stores)."""
        target = self.path(rel)
        with self._naming("upload", rel):
            if self.is_local:
                self._replace_local(target, lambda temporary: self.fs.put_file(local_path, temporary))
            else:
                self.fs.put_file(local_path, target)

    def download(self, rel: str, local_path: str) -> None:
        with self._naming("download", rel):
            self.fs.get_file(self.path(rel), local_path)

    def read_bytes(self, rel: str) -> bytes:
        with self._naming("read", rel):
            return self.fs.cat_file(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def list_names(self, rel_dir: str) -> list[str]:
        """Names of the objects directly under a directory (empty when it does not exist)."""
        directory = self.path(rel_dir)
        self.fs.invalidate_cache(directory)
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(directory, detail=False))
        except FileNotFoundError:
            return []

    def delete(self, rel: str) -> None:
        self.fs.rm(self.path(rel))

    def inventory(self, rel_dir: str) -> list[StoredObject]:
        """Every object under a directory, at any depth (empty when there is none)."""
        directory = self.path(rel_dir)
        self.fs.invalidate_cache()
        with self._naming("listing", rel_dir):
            try:
                found = self.fs.find(directory, detail=True)
            except FileNotFoundError:
                return []
        prefix = self.root_path.rstrip("/") + "/"
        return sorted(
            (
                StoredObject(path[len(prefix) :], int(info["size"]), _modified(info))
                for path, info in found.items()
                if info.get("type", "file") == "file" and path.startswith(prefix)
            ),
            key=lambda o: o.rel,
        )

    def delete_many(self, rels: list[str], batch: int = 1000) -> None:
        """Delete objects in the order given, `batch` to a request (S3's DeleteObjects takes 1,000); locally, the
        folders left empty go too."""
        for start in range(0, len(rels), batch):
            chunk = rels[start : start + batch]
            with self._naming("delete", chunk[0]):
                self.fs.rm([self.path(rel) for rel in chunk])
        if self.is_local:
            for folder in sorted({posixpath.dirname(self.path(rel)) for rel in rels}, key=len, reverse=True):
                while folder.startswith(self.root_path.rstrip("/") + "/") and not os.listdir(folder):
                    os.rmdir(folder)
                    folder = posixpath.dirname(folder)

    def write_json(self, rel: str, value: Any) -> str:
        return self.write_bytes(rel, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    # -- manifests ----------------------------------------------------------------------------------------------
    def write_manifest(self, rel_dir: str, manifest: M, name: str = MANIFEST_NAME, exclusive: bool = False) -> M | None:
        """Publish a directory: the manifest is written after every object it lists. `exclusive`: only if no
        manifest exists yet (None when one does)."""
        rel = posixpath.join(rel_dir, name)
        value = manifest.model_dump(mode="json", by_alias=True)
        if exclusive:
            data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
            return manifest if self.create_exclusive(rel, data) else None
        self.write_json(rel, value)
        return manifest

    def read_manifest(self, rel_dir: str, model: type[M], name: str = MANIFEST_NAME) -> M | None:
        """The directory's manifest, validated as `model`, or None when the directory was never published."""
        rel = posixpath.join(rel_dir, name)
        try:
            raw = self.read_bytes(rel)
        except FileNotFoundError:
            return None
        try:
            return model.model_validate_json(raw)
        except ValueError as exc:
            raise PipelineError(f"{self.url(rel)}: unreadable manifest: {exc}") from None

    def read_verified(self, rel_dir: str, entry: FileEntry, max_bytes: int | None = None) -> bytes:
        """An object's bytes, refused unless they match the manifest's sha256. Its size is checked first (against
        the manifest and `max_bytes`), so an oversized or swapped object is refused before it is downloaded."""
        rel = posixpath.join(rel_dir, entry.name)
        with self._naming("size check", rel):
            size = self.fs.size(self.path(rel))
        if size != entry.bytes:
            raise PipelineError(f"{self.url(rel)}: {size} bytes, but the manifest lists {entry.bytes}")
        if max_bytes is not None and size > max_bytes:
            raise PipelineError(f"{self.url(rel)}: {size} bytes, over the limit of {max_bytes}")
        data = self.read_bytes(rel)
        digest = sha256_hex(data)
        if digest != entry.sha256 or len(data) != entry.bytes:
            raise PipelineError(
                f"{self.url(rel_dir, entry.name)}: checksum mismatch (manifest sha256 {entry.sha256[:12]}…, "
                f"{entry.bytes} bytes; found {digest[:12]}…, {len(data)} bytes)"
            )
        return data

    def remove_unlisted(self, rel_dir: str, keep: set[str], prefix: str = "part-") -> list[str]:
        """Delete leftovers of an earlier attempt that the new manifest will not list."""
        removed = [n for n in self.list_names(rel_dir) if n.startswith(prefix) and n not in keep]
        for name in removed:
            self.delete(posixpath.join(rel_dir, name))
        if removed:
            log.info("removed %d unlisted objects under %s", len(removed), self.url(rel_dir))
        return removed
