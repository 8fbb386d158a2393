"""Block files (`pipeline.store.blocks`): any rows round-trip exactly, in any order and across block boundaries, with
and without a trained dictionary; the same rows give the same bytes; a file whose bytes were changed is refused, naming
it. And the 8-bit scalar quantizer of the kept vectors (`pipeline.store.segments.Sq8`)."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import PipelineError
from pipeline.store.blocks import BLOCK_ROWS, TRAIN_ROWS, BlockFile, BlockWriter, chunks_of, open_table
from pipeline.store.docstore import DOCSTORE_SCHEMA, tokens_schema
from pipeline.store.segments import SQ8_FILE, VECTORS_FILE, Sq8, Sq8Vectors, VectorWriter, open_refine

TOKENS = tokens_schema(30522)
WIDE_TOKENS = tokens_schema(2**17)
texts = st.text(st.characters(codec="utf-8"), max_size=60)


def _write(path, schema, table: pa.Table, cuts: list[int]) -> BlockFile:
    writer = BlockWriter(str(path), schema)
    start = 0
    for cut in [*cuts, table.num_rows]:
        cut = min(max(cut, start), table.num_rows)
        writer.write_table(table.slice(start, cut - start))
        start = cut
    writer.close()
    return BlockFile(str(path))


@given(
    rows=st.lists(st.tuples(texts, texts, texts), max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=3),
    picks=st.lists(st.integers(0, 10**6), max_size=30),
)
def test_any_passages_round_trip_in_any_order(tmp_path_factory, rows, cuts, picks):
    table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(DOCSTORE_SCHEMA.names)}, DOCSTORE_SCHEMA)
    stored = _write(tmp_path_factory.mktemp("b") / "d.zst", DOCSTORE_SCHEMA, table, sorted(cuts))
    assert stored.num_rows == len(rows) and stored.read_all().equals(table)
    if rows:
        at = pa.array([p % len(rows) for p in picks], pa.int64())
        assert stored.take(at).equals(table.take(at))


@given(
    ids=st.lists(
        st.tuples(st.lists(st.integers(0, 2**17 - 1), max_size=20), st.lists(st.integers(0, 2**17 - 1), max_size=80)),
        max_size=25,
    ),
    wide=st.booleans(),
)
def test_any_token_ids_round_trip(tmp_path_factory, ids, wide):
    schema = WIDE_TOKENS if wide else TOKENS
    top = 2**17 if wide else 2**16
    values = [([t % top for t in title], [t % top for t in text]) for title, text in ids]
    table = pa.table({"title_ids": [v[0] for v in values], "text_ids": [v[1] for v in values]}, schema)
    stored = _write(tmp_path_factory.mktemp("b") / "t.zst", schema, table, [])
    assert stored.read_all().equals(table)
    backwards = pa.array(range(len(values) - 1, -1, -1), pa.int64())
    assert stored.take(backwards).equals(table.take(backwards))


def _passages(count: int) -> pa.Table:
    rng = np.random.default_rng(3)
    words = [f"word{i}" for i in range(2000)]
    texts = [" ".join(rng.choice(words, 100)) for _ in range(count)]
    return pa.table(
        {"id": [str(i) for i in range(count)], "title": [f"T {i // 7}" for i in range(count)], "text": texts}
    )


def test_a_segment_past_the_training_rows_is_compressed_with_its_dictionary_and_the_same_rows_give_the_same_file(
    tmp_path,
):
    table = _passages(TRAIN_ROWS + 301)
    one = _write(tmp_path / "one.zst", DOCSTORE_SCHEMA, table, [100, 4000])
    _write(tmp_path / "two.zst", DOCSTORE_SCHEMA, table, [2500])
    assert (tmp_path / "one.zst").read_bytes() == (tmp_path / "two.zst").read_bytes()
    assert one._dictionary is not None and len(one.offsets) == -(-table.num_rows // BLOCK_ROWS) + 1
    assert one.read_all().equals(table)
    picks = np.random.default_rng(0).integers(0, table.num_rows, 200)
    assert one.take(picks).equals(table.take(picks))
    assert pa.concat_tables(list(chunks_of(one, 1000))).equals(table)
    raw = sum(len(t.encode()) for t in table.column("text").to_pylist())
    assert (tmp_path / "one.zst").stat().st_size < raw / 2  # compressed


def test_a_file_changed_anywhere_is_refused_naming_it(tmp_path):
    table = _passages(300)
    _write(tmp_path / "d.zst", DOCSTORE_SCHEMA, table, [])
    data = (tmp_path / "d.zst").read_bytes()
    stored = BlockFile(str(tmp_path / "d.zst"))
    frame = int(stored.offsets[5]) + 20  # inside block 5
    cases = {
        "frame": data[:frame] + bytes([data[frame] ^ 0x40]) + data[frame + 1 :],
        "truncated": data[:-30],
        "magic": b"X" + data[1:],
    }
    for what, changed in cases.items():
        path = tmp_path / f"{what}.zst"
        path.write_bytes(changed)
        with pytest.raises(PipelineError, match=str(path)):
            BlockFile(str(path)).take(list(range(300)))
    with pytest.raises(PipelineError, match="rows 300..300 asked of 300"):
        stored.take([300])


def test_arrow_files_of_versions_before_blocks_still_open(tmp_path):
    table = _passages(50)
    with pa.ipc.new_file(str(tmp_path / "docstore.arrow"), DOCSTORE_SCHEMA) as out:
        out.write_table(table)
    opened = open_table(str(tmp_path / "docstore.arrow"))
    assert isinstance(opened, pa.Table) and opened.equals(table)
    assert pa.concat_tables(list(chunks_of(opened, 7))).equals(table)


def test_sq8_codes_decode_within_half_a_step_of_each_vector_and_score_like_fp16(tmp_path):
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((2000, 64)) * rng.uniform(0.1, 3, 64)).astype(np.float32)
    sq8 = Sq8.train(vectors[:1500])
    step = sq8.trained[1] / 255  # each dimension's width / 255
    inside = np.clip(vectors[1500:], sq8.trained[0], sq8.trained[0] + sq8.trained[1])
    assert np.all(np.abs(sq8.decode(sq8.encode(inside)) - inside) <= step / 2 + 1e-5)
    Sq8.read(sq8.save(str(tmp_path / "q.npy")), 64, "q")  # stored and read back
    assert np.array_equal(Sq8.read(str(tmp_path / "q.npy"), 64, "q").trained, sq8.trained)
    with pytest.raises(PipelineError, match="for 32 dims"):
        Sq8.read(str(tmp_path / "q.npy"), 32, "q")

    for name, dtype, rows in ((VECTORS_FILE, np.float16, vectors), (SQ8_FILE, np.uint8, sq8.encode(vectors))):
        writer = VectorWriter(str(tmp_path / name), 64, dtype)
        writer.add(rows[:1000])
        writer.add(rows[1000:])
        writer.close()
    fp16 = open_refine({VECTORS_FILE: str(tmp_path / VECTORS_FILE)}, 2000, 64, "s", None)
    codes = open_refine({SQ8_FILE: str(tmp_path / SQ8_FILE)}, 2000, 64, "s", sq8)
    assert isinstance(codes, Sq8Vectors) and codes.shape == (2000, 64)
    query = rng.standard_normal(64).astype(np.float32)
    exact = vectors @ query
    for kept in (fp16, codes):
        scored = np.asarray(kept[np.arange(2000)], np.float32) @ query
        assert np.corrcoef(exact, scored)[0, 1] > 0.999
    with pytest.raises(PipelineError, match="no sq8 quantizer"):
        open_refine({SQ8_FILE: str(tmp_path / SQ8_FILE)}, 2000, 64, "s", None)
