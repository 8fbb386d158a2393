"""Row tables stored as zstd-compressed blocks of a few rows, read per row through a memory map: a segment's
docstore (id, title, text) and reader token ids (title_ids, text_ids). A hit decompresses only its own block (4 rows,
~2.5 KB of text), so a replica's disk holds each passage's text at about a third of its size and reads it in
microseconds (`benchmarks/docstore.py`).

A file, little-endian:
    b"QABLOCK1"  frame 0 … frame n-1  dictionary  offsets  header  uint32 header length  b"QABLOCK1"
- each frame is one block of `block_rows` rows (the last may be shorter), compressed with zstd and the file's
  dictionary (trained on the segment's first rows; none when too few rows to train one), with a checksum.
  Decompressed, a frame is uint32 byte lengths (row-major: row 0's fields, row 1's, ...), then the fields' bytes
  in that order;
- `offsets`: uint64 [n + 1], where each frame starts and the last ends (bytes from the start of the file);
- `header`: JSON {"rows", "block_rows", "fields": [[name, kind]...], "dictionary": bytes}; kind `utf8` for strings,
  `uint16` / `uint32` for lists of token ids (their raw values).

Readers get Arrow tables (`BlockFile.take`), so the docstore's users see what the uncompressed Arrow docstores of
earlier versions give them. The file is checked against its manifest's sha256 before it is opened, like every
other; the reader still refuses a file whose structure does not add up, naming it.
"""

from __future__ import annotations

import json
import mmap
import struct
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import zstandard

from pipeline.errors import PipelineError

MAGIC = b"QABLOCK1"
BLOCK_ROWS = 4  # 8 saves ~4% of the bytes and costs ~40% more per random hit
LEVEL = 9
DICTIONARY_BYTES = 32768
TRAIN_ROWS = 4096  # rows buffered to train the dictionary before the first block is written
KINDS = {"utf8": pa.string(), "uint16": pa.list_(pa.uint16()), "uint32": pa.list_(pa.uint32())}


def kind_of(data_type: pa.DataType) -> str:
    for kind, known in KINDS.items():
        if data_type == known:
            return kind
    raise PipelineError(f"block files store strings and lists of uint16 or uint32, not {data_type}")


def _row_bytes(table: pa.Table, kinds: list[str]) -> list[list[bytes]]:
    """Each row's fields as bytes, row-major."""
    columns = []
    for name, column, kind in zip(table.column_names, table.columns, kinds):
        if column.null_count:
            raise PipelineError(f"column {name!r} has {column.null_count} nulls: block files store none")
        if kind == "utf8":
            columns.append([value.encode() for value in column.to_pylist()])
        else:
            array = column.combine_chunks()
            offsets = array.offsets.to_numpy()
            values = array.values.to_numpy(zero_copy_only=False).tobytes()
            width = array.values.type.byte_width
            columns.append([values[offsets[i] * width : offsets[i + 1] * width] for i in range(len(array))])
    return [list(row) for row in zip(*columns)]


class BlockWriter:
    """Rows appended as Arrow tables of `schema`, written block by block (memory: the dictionary's training rows)."""

    def __init__(self, path: str, schema: pa.Schema, block_rows: int = BLOCK_ROWS):
        self.path, self.schema, self.block_rows = path, schema, block_rows
        self.kinds = [kind_of(f.type) for f in schema]
        self.rows = 0
        self._pending: list[list[bytes]] = []
        self._offsets: list[int] = []
        self._compressor: zstandard.ZstdCompressor | None = None
        self._dictionary = b""
        self._file = open(path, "wb")
        self._file.write(MAGIC)

    def write_table(self, table: pa.Table) -> None:
        self._pending += _row_bytes(table.select(self.schema.names), self.kinds)
        self.rows += table.num_rows
        if self._compressor is None and len(self._pending) < TRAIN_ROWS:
            return
        self._flush(final=False)

    def _block(self, rows: list[list[bytes]]) -> bytes:
        lengths = np.array([len(field) for row in rows for field in row], dtype="<u4")
        return lengths.tobytes() + b"".join(field for row in rows for field in row)

    def _start(self) -> None:
        """Train the dictionary on the buffered rows' blocks (deterministic: the same rows give the same file)."""
        step = self.block_rows
        blocks = [self._block(self._pending[i : i + step]) for i in range(0, len(self._pending), step)]
        try:
            if len(blocks) < 8:
                raise zstandard.ZstdError("too few blocks")
            trained = zstandard.train_dictionary(DICTIONARY_BYTES, blocks, threads=0)
            self._dictionary = trained.as_bytes()
            self._compressor = zstandard.ZstdCompressor(level=LEVEL, dict_data=trained, write_checksum=True)
        except zstandard.ZstdError:  # too few rows to learn from: plain zstd
            self._compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True)

    def _flush(self, final: bool) -> None:
        if self._compressor is None:
            self._start()
        whole = len(self._pending) if final else len(self._pending) - len(self._pending) % self.block_rows
        for start in range(0, whole, self.block_rows):
            self._offsets.append(self._file.tell())
            self._file.write(self._compressor.compress(self._block(self._pending[start : start + self.block_rows])))
        self._pending = self._pending[whole:]

    def close(self) -> None:
        self._flush(final=True)
        self._offsets.append(self._file.tell())
        self._file.write(self._dictionary)
        self._file.write(np.array(self._offsets, dtype="<u8").tobytes())
        header = {
            "rows": self.rows,
            "block_rows": self.block_rows,
            "fields": [[f.name, kind] for f, kind in zip(self.schema, self.kinds)],
            "dictionary": len(self._dictionary),
        }
        encoded = json.dumps(header, sort_keys=True).encode()
        self._file.write(encoded + struct.pack("<I", len(encoded)) + MAGIC)
        self._file.close()


class BlockFile:
    """A block file memory-mapped (one already checked against its manifest's sha256): `take` decompresses only the
    blocks of the rows asked for. Safe to share between threads (one decompressor per thread)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        size = len(self._map)
        if size < 2 * len(MAGIC) + 4 or self._map[: len(MAGIC)] != MAGIC or self._map[-len(MAGIC) :] != MAGIC:
            raise PipelineError(f"{path}: not a block file")
        (length,) = struct.unpack("<I", self._map[-len(MAGIC) - 4 : -len(MAGIC)])
        end = size - len(MAGIC) - 4
        try:
            header = json.loads(self._map[end - length : end])
            self.num_rows, self.block_rows = int(header["rows"]), int(header["block_rows"])
            self.fields = [(str(name), str(kind)) for name, kind in header["fields"]]
            self.schema = pa.schema([(name, KINDS[kind]) for name, kind in self.fields])
            blocks = -(-self.num_rows // self.block_rows)
            offsets_at = end - length - 8 * (blocks + 1)
            self.offsets = np.frombuffer(self._map, dtype="<u8", count=blocks + 1, offset=offsets_at)
            dictionary = bytes(self._map[offsets_at - int(header["dictionary"]) : offsets_at])
        except (ValueError, KeyError, TypeError) as exc:
            raise PipelineError(f"{path}: unreadable block file header ({exc})") from None
        if (
            self.offsets[0] != len(MAGIC)
            or self.offsets[-1] != offsets_at - len(dictionary)
            or np.any(np.diff(self.offsets.astype(np.int64)) <= 0)
        ):
            raise PipelineError(f"{path}: its block offsets do not add up")
        self._dictionary = zstandard.ZstdCompressionDict(dictionary) if dictionary else None
        self._local = threading.local()

    def __len__(self) -> int:
        return self.num_rows

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        found = getattr(self._local, "decompressor", None)
        if found is None:
            found = self._local.decompressor = zstandard.ZstdDecompressor(dict_data=self._dictionary)
        return found

    def _frame(self, number: int) -> tuple[bytes, list[int]]:
        """Block `number` decompressed, and its fields' byte lengths (row-major)."""
        start, end = int(self.offsets[number]), int(self.offsets[number + 1])
        count = min(self.block_rows, self.num_rows - number * self.block_rows) * len(self.fields)
        try:
            data = self._decompressor().decompress(self._map[start:end])
        except zstandard.ZstdError as exc:
            raise PipelineError(f"{self.path}: block {number} does not decompress ({exc})") from None
        lengths = np.frombuffer(data, dtype="<u4", count=count).tolist()
        if 4 * count + sum(lengths) != len(data):
            raise PipelineError(f"{self.path}: block {number} holds {len(data)} bytes, its lengths do not add up")
        return data, lengths

    def _row(self, data: bytes, lengths: list[int], row: int) -> list[bytes]:
        """Row `row` of a decompressed block: its fields' bytes."""
        width = len(self.fields)
        at = 4 * len(lengths) + sum(lengths[: row * width])
        fields = []
        for length in lengths[row * width : (row + 1) * width]:
            fields.append(data[at : at + length])
            at += length
        return fields

    def take(self, indices) -> pa.Table:
        """Rows `indices` (any order, repeats allowed) as an Arrow table of the file's schema: each block they fall
        in decompressed once."""
        rows = np.asarray(indices.to_numpy() if isinstance(indices, pa.Array) else indices, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise PipelineError(f"{self.path}: rows {rows.min()}..{rows.max()} asked of {self.num_rows}")
        frames: dict[int, tuple[bytes, list[int]]] = {}
        picked = []
        for row in rows.tolist():
            number, within = divmod(row, self.block_rows)
            frame = frames.get(number)
            if frame is None:
                frame = frames[number] = self._frame(number)
            picked.append(self._row(*frame, within))
        return self._table(picked)

    def _table(self, rows: list[list[bytes]]) -> pa.Table:
        columns = []
        for i, (_, kind) in enumerate(self.fields):
            values = [row[i] for row in rows]
            if kind == "utf8":
                columns.append(pa.array(values, pa.binary()).cast(pa.string()))
            else:
                flat = np.frombuffer(b"".join(values), dtype="<" + ("u2" if kind == "uint16" else "u4"))
                lengths = np.array([len(v) for v in values], dtype=np.int64) // flat.itemsize
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
                columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)))
        return pa.Table.from_arrays(columns, schema=self.schema)

    def chunks(self, rows: int = 65536) -> Iterator[pa.Table]:
        """The whole file in order, `rows` at a time (compaction, checks)."""
        for start in range(0, self.num_rows, rows):
            yield self.take(np.arange(start, min(start + rows, self.num_rows)))

    def read_all(self) -> pa.Table:
        return pa.concat_tables(list(self.chunks())) if self.num_rows else self.schema.empty_table()

    def column(self, name: str) -> pa.ChunkedArray:
        return self.read_all().column(name)


def open_table(path: str) -> pa.Table | BlockFile:
    """A docstore or token-id file, verified already: an uncompressed Arrow IPC file (versions before block files)
    memory-mapped whole, or a block file."""
    with open(path, "rb") as handle:
        compressed = handle.read(len(MAGIC)) == MAGIC
    if compressed:
        return BlockFile(path)
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


def chunks_of(table: pa.Table | BlockFile, rows: int = 65536) -> Iterator[pa.Table]:
    """Either kind of table in order, at most `rows` rows at a time."""
    if isinstance(table, BlockFile):
        yield from table.chunks(rows)
    else:
        for start in range(0, table.num_rows, rows):
            yield table.slice(start, rows)
