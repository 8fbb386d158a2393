"""Index building: planning and sampling without I/O, then the job end to end on the encode job's output."""

import json

import numpy as np
import pytest
import requests
import s3fs
import tantivy

from pipeline.build_index import plan_build, plan_compaction, plan_index, recall_at, sample_positions
from pipeline.config import IndexConfig
from pipeline.errors import PipelineError
from pipeline.index_workers import merge_topk, plan_groups, refine_merged
from pipeline.lexical import load_lexical
from pipeline.manifests import IndexManifest
from pipeline.segments import ROW_MASK, load_published
from pipeline.storage import Storage
from tests.helpers import kill_when_logged, run_job, synthetic_rows, write_config, write_tsv

ROWS = synthetic_rows(800, words=30)


def test_sample_is_uniform_across_shards_of_different_sizes_and_distributions():
    rows = [5000, 50, 2000, 10, 3000]
    picks = sample_positions(rows, 1000, seed=7)
    counts = [len(p) for p in picks]
    assert sum(counts) == 1000 and all(c > 0 for c in counts[:3] + counts[4:])
    for count, n in zip(counts, rows):
        assert abs(count / 1000 - n / sum(rows)) < 0.05  # proportional: not the first N
    assert all(len(set(p.tolist())) == len(p) and (p < n).all() for p, n in zip(picks, rows))
    assert all((a == b).all() for a, b in zip(picks, sample_positions(rows, 1000, seed=7)))
    assert any((a != b).any() for a, b in zip(picks, sample_positions(rows, 1000, seed=8)) if len(a) == len(b))


def test_sample_covers_shards_holding_different_distributions():
    """Shards hold different clusters (psgs_w100 is ordered by article); a first-N sample would see one."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 100
    shards = [centers[i] + rng.normal(size=(500, 16)) for i in range(4)]
    picks = sample_positions([500] * 4, 200, seed=1)
    sample = np.concatenate([s[p] for s, p in zip(shards, picks)])
    nearest = np.argmin(((sample[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
    assert np.bincount(nearest, minlength=4).min() >= 30  # each distribution ~50 of the 200


def test_plan_sizes_training_and_memory():
    config = IndexConfig(train_size=100_000, queries=1000)
    plan = plan_index("OPQ64_256,IVF65536,PQ64", 768, 21_000_000, 100_000, config)
    assert plan.nlist == 65536 and plan.train_size == 100_000  # 39 x 65536 wanted, capped
    assert plan.code_bytes == 64 + 8
    assert 1.4e9 < plan.memory_bytes < 3e9
    small = plan_index("IVF16,PQ8x4", 32, 1000, 100, IndexConfig())
    assert small.train_size == 1000 - small.queries and small.queries == 100
    with pytest.raises(PipelineError, match="not a valid FAISS factory"):
        plan_index("IVF16,Nonsense", 32, 1000, 100, IndexConfig())


def test_recall_at_counts_overlap():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    ann = np.array([[1, 2, 9, 9], [8, 7, 6, 5]])
    assert recall_at(ann, exact, 2) == 0.5 and recall_at(ann, exact, 4) == 0.75


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_models, s3_endpoint, ray_address):
    """One snapshot ingested and encoded with the tiny DPR encoder on S3, shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("index")
    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir("idx")
    fs.put_file(str(write_tsv(tmp / "psgs.tsv.gz", ROWS)), "idx/in/psgs.tsv.gz")
    config = write_config(
        tmp / "c.yaml",
        {
            "storage": {"root": "s3://idx/root", "options": {"endpoint_url": s3_endpoint}},
            "ingest": {"input": "s3://idx/in/psgs.tsv.gz", "snapshot": "snap", "shard_rows": 150},
            "encode": {"model": tiny_models["ctx"], "pooling": "dpr", "max_length": 64},
            "index": {"factory": "IVF4,PQ32x8", "nprobe": 4, "queries": 200, "min_recall": 0.9},
        },
    )
    for job in ("ingest", "encode"):
        run = run_job(job, config)
        assert run.returncode == 0, run.stderr[-3000:]
    return {"config": config, "fs": fs, "storage": Storage("s3://idx/root", {"endpoint_url": s3_endpoint}), "tmp": tmp}


def _latest(fs):
    fs.invalidate_cache()
    return fs.cat_file("idx/root/indexes/LATEST").decode().strip() if fs.exists("idx/root/indexes/LATEST") else None


def test_build_index_end_to_end(encoded):
    run = run_job("build_index", encoded["config"])
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    assert summary["job"] == "build_index" and summary["vectors"] == 800
    assert summary["recall_at_100"] >= 0.9 and 0 < summary["bytes_per_vector"] < 100
    assert summary["train_seconds"] >= 0 and summary["add_seconds"] >= 0
    assert _latest(encoded["fs"]) == summary["version"]

    published = load_published(encoded["storage"], None, str(encoded["tmp"] / "cache"))
    assert published.version == summary["version"] and published.vectors == 800
    ids, names = published.live_ids()
    assert names == [pid for pid, _, _ in ROWS]  # one segment, in corpus order
    assert published.passages(ids).column("title").to_pylist() == [title for _, _, title in ROWS]
    assert [s.rows for s in published.manifest.segments] == [800] and published.manifest.tombstones is None
    manifest = published.manifest
    assert manifest.snapshot == "snap" and manifest.factory == "IVF4,PQ32x8" and manifest.nprobe == 4
    assert manifest.fingerprint.startswith("dpr-ctx-tiny-") and manifest.encoder["pooling"] == "dpr"

    # each passage's own vector finds itself first
    from pipeline.text_encoder import EncoderSettings, TextEncoder

    encoder = TextEncoder(EncoderSettings(manifest.encoder["model"], "dpr", max_length=64), device="cpu")
    vectors = encoder.encode([t for _, _, t in ROWS], [x for _, x, _ in ROWS])
    _, found = published.search(vectors, 1)
    found_ids = published.passages(found[:, 0]).column("id").to_pylist()
    assert np.mean([a == pid for a, (pid, _, _) in zip(found_ids, ROWS)]) >= 0.95

    again = run_job("build_index", encoded["config"])
    assert again.returncode == 0 and again.summary["reused"] is True
    assert again.summary["version"] == summary["version"]


def test_recall_gate_refuses_a_bad_factory(encoded):
    before = _latest(encoded["fs"])
    run = run_job(
        "build_index", encoded["config"], "index.factory=IVF32,PQ2x4", "index.nprobe=1", "index.min_recall=0.9"
    )
    assert run.returncode == 1
    assert "below index.min_recall 0.9" in run.stderr and "not published" in run.summary["error"]
    version = run.summary["error"].split("version ")[1].split()[0]
    assert not encoded["fs"].exists(f"idx/root/indexes/{version}/manifest.json")
    assert _latest(encoded["fs"]) == before


def test_memory_estimate_refuses_before_building(encoded):
    run = run_job("build_index", encoded["config"], "index.max_memory=64KB", "index.seed=3")
    assert run.returncode == 1
    assert "needs about" in run.stderr and "index.max_memory" in run.stderr
    assert "train" not in [line.split(": ")[-1] for line in run.stderr.splitlines() if "pipeline.build_index" in line]


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        (".faiss", "flip", ".faiss: checksum mismatch"),  # the shared quantizer
        ("ivf.bin", "flip", "ivf.bin: checksum mismatch"),  # a segment's inverted lists
        ("docstore.arrow", "flip", "docstore.arrow: checksum mismatch"),
        ("ivf.bin", "truncate", "ivf.bin: checksum mismatch"),
        ("vectors.npy", "flip", "vectors.npy: checksum mismatch"),  # the fp16 copies refine reads
        ("manifest.json", "truncate", "unreadable manifest"),
    ],
)
def test_tampered_files_are_refused_before_read_index(encoded, name, damage, expected):
    run = run_job("build_index", encoded["config"])
    assert run.returncode == 0, run.stderr[-3000:]
    fs, version = encoded["fs"], run.summary["version"]
    listed = json.loads(fs.cat_file(f"idx/root/indexes/{version}/manifest.json"))["files"]
    relative = (
        f"{version}/{name}" if name == "manifest.json" else next(e["name"] for e in listed if e["name"].endswith(name))
    )
    path = f"idx/root/indexes/{relative}"
    original = fs.cat_file(path)
    try:
        fs.pipe_file(path, original[:-16] + bytes(16) if damage == "flip" else original[: len(original) // 2])
        cache = encoded["tmp"] / f"cache-{name}-{damage}"
        with pytest.raises(PipelineError, match=expected):
            load_published(encoded["storage"], version, str(cache))
        assert not (cache / relative).exists()  # the bad copy is not kept for a later load
    finally:
        fs.pipe_file(path, original)


@pytest.mark.reliability
def test_the_bm25_index_is_published_with_the_version_and_a_tampered_file_is_refused(encoded):
    run = run_job("build_index", encoded["config"])
    assert run.returncode == 0, run.stderr[-3000:]
    fs, storage, version = encoded["fs"], encoded["storage"], run.summary["version"]
    manifest = load_published(storage, version, str(encoded["tmp"] / "cache-bm25")).manifest
    assert manifest.lexical and set(manifest.lexical.values()) <= {e.name for e in manifest.files}
    lexical = load_lexical(storage, manifest, str(encoded["tmp"] / "cache-bm25"))
    pid, text, _ = ROWS[123]
    assert lexical.search([text], 1)[0][0]["id"] == pid  # a passage's own words find it first
    store = next(name for name in manifest.lexical.values() if name.endswith(".store"))
    path = f"idx/root/indexes/{store}"
    original = fs.cat_file(path)
    try:
        fs.pipe_file(path, original[:-16] + bytes(16))
        with pytest.raises(PipelineError, match=r"\.store: checksum mismatch.*BM25 index"):
            load_lexical(storage, manifest, str(encoded["tmp"] / "cache-bm25-tampered"))
    finally:
        fs.pipe_file(path, original)


@pytest.mark.reliability
def test_a_build_killed_mid_way_reruns_to_the_bytes_of_a_clean_build(encoded):
    """SIGKILL during training: nothing is published; the rerun publishes, byte for byte, what a clean build does."""
    import signal

    fs, before = encoded["fs"], _latest(encoded["fs"])
    overrides = ["index.seed=7", "index.reuse_trained=false"]
    killed = kill_when_logged("build_index", encoded["config"], "pipeline.build_index: train…", *overrides)
    assert killed == -signal.SIGKILL
    assert _latest(fs) == before

    rerun = run_job("build_index", encoded["config"], *overrides)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    version = rerun.summary["version"]

    def published_files() -> tuple[dict[str, str], list[str]]:
        """The dense index's files → sha256, and the BM25 index's documents (tantivy names its segments with
        random ids, so its bytes differ from run to run: its content is compared instead)."""
        fs.invalidate_cache()
        manifest = IndexManifest.model_validate_json(fs.cat_file(f"idx/root/indexes/{version}/manifest.json"))
        lexical = load_lexical(encoded["storage"], manifest, str(encoded["tmp"] / f"cache-{manifest.created_at}"))
        searcher = lexical.index.searcher()
        docs = sorted(searcher.doc(a)["id"][0] for _, a in searcher.search(tantivy.Query.all_query(), 10_000).hits)
        dense = {e.name: e.sha256 for e in manifest.files if e.name not in set(manifest.lexical.values())}
        return dense, docs

    first = published_files()
    fs.rm(f"idx/root/indexes/{version}", recursive=True)
    clean = run_job("build_index", encoded["config"], *overrides)
    assert clean.returncode == 0 and clean.summary["version"] == version and clean.summary["reused"] is False
    second = published_files()
    assert first == second and first[1] == sorted(pid for pid, _, _ in ROWS)
    kinds = sorted(name.rsplit("/", 1)[-1].rsplit(".", 1)[-1] for name in first[0])
    assert kinds == ["arrow", "bin", "faiss", "npy", "npy"]  # docstore, lists, quantizer, keys, vectors
    if before is not None:
        fs.pipe_file("idx/root/indexes/LATEST", f"{before}\n".encode())


def test_plan_build_picks_delta_full_or_current():
    chain = ["d1", "d2", "d3"]
    assert plan_build(chain, "d1", True) == ("delta", 1)  # add d2 and d3 onto the version of d1
    assert plan_build(chain, "d2", True) == ("delta", 2)
    assert plan_build(chain, "d3", True) == ("current", 3)
    assert plan_build(chain, "d3", False)[0] == "full"  # other settings (nprobe, seed, ...)
    assert plan_build(chain, "x9", True)[0] == "full"  # another lineage
    assert plan_build(chain, None, True)[0] == "full"


def test_compaction_thresholds():
    config = IndexConfig(max_segments=3, max_tombstone_fraction=0.2)
    assert plan_compaction([100, 10, 10], [20, 0, 0], config) == []
    assert plan_compaction([100, 10, 10, 10], [0] * 4, config) == [0, 1, 2, 3]  # a fourth segment: all merged
    assert plan_compaction([100, 10], [23, 0], config) == [0, 1]  # 23 of 110 rows dead
    assert plan_compaction([100], [0], config.model_copy(update={"compact": "always"})) == []  # nothing to gain
    assert plan_compaction([100], [1], config.model_copy(update={"compact": "always"})) == [0]
    assert plan_compaction([100] * 9, [90] * 9, config.model_copy(update={"compact": "never"})) == []


def test_compaction_with_bounded_segments_merges_the_small_and_the_dead_heavy_only():
    """A distributed build's big segments are not copied again because nightly deltas pile up beside them."""
    config = IndexConfig(max_segments=2, max_tombstone_fraction=0.2, segment_vectors=1000)
    big = [1000, 1000, 900]
    assert plan_compaction(big + [10, 10], [0] * 5, config) == []  # two small segments: within the limit
    assert plan_compaction(big + [10, 10, 10], [0] * 6, config) == [3, 4, 5]
    assert plan_compaction(big + [10, 10, 10], [0, 300, 0, 0, 0, 0], config) == [1, 3, 4, 5]  # 30% of one dead
    assert plan_compaction(big + [10], [0, 150, 0, 0], config) == []  # 5% of the version dead
    assert plan_compaction([1000, 1000], [0, 600], config) == [1]  # 30% of the version: the dead-heavy one alone
    assert plan_compaction([1000, 600, 10], [0, 0, 0], config.model_copy(update={"compact": "always"})) == []
    assert plan_compaction([1000, 10, 10], [1, 0, 0], config.model_copy(update={"compact": "always"})) == [0, 1, 2]


def test_shard_groups_bound_each_segment():
    assert plan_groups([100, 100, 100, 100, 100], 250) == [[0, 1], [2, 3], [4]]
    assert plan_groups([100, 400, 50, 50], 250) == [[0], [1], [2, 3]]  # a shard over the bound goes alone
    assert plan_groups([10] * 3, 1000) == [[0, 1, 2]]
    assert plan_groups([], 10) == []


def test_merged_topk_is_the_topk_of_the_union():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 40)).astype(np.float32)
    scores[:, 7] = scores[:, 8]  # a tie, broken by the smaller id
    ids = np.arange(40, dtype=np.int64)[None].repeat(5, 0)
    parts = []
    for cut in ((0, 13), (13, 14), (14, 40)):
        part_scores, part_ids = scores[:, cut[0] : cut[1]], ids[:, cut[0] : cut[1]]
        order = np.argsort(-part_scores, axis=1, kind="stable")[:, :10]
        top_scores = np.take_along_axis(part_scores, order, 1)
        top_ids = np.take_along_axis(part_ids, order, 1)
        if top_ids.shape[1] < 10:  # a part with fewer rows than k pads with -1, as FAISS does
            pad = 10 - top_ids.shape[1]
            top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
        parts.append((top_scores, top_ids))
    merged_scores, merged_ids = merge_topk(parts, 10)
    expected = np.lexsort((ids, -scores), axis=-1)[:, :10]
    assert (merged_ids == expected).all()
    assert np.allclose(merged_scores, np.take_along_axis(scores, expected, 1))
    few_scores, few_ids = merge_topk([(np.array([[1.0, -np.inf]]), np.array([[4, -1]]))], 2)
    assert few_ids.tolist() == [[4, -1]]


def test_copied_codes_search_like_the_segments_they_merge():
    """Compaction copies codes list by list: the merged segment answers exactly as the live rows of the stacked
    segments did (no vector is needed)."""
    import faiss

    from pipeline.segments import SEQ_SHIFT, copy_live_codes, faiss_ids, search_parameters

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    quantizer = faiss.index_factory(16, "IVF8,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    quantizer.train(vectors)
    parts = []
    for seq, chunk in ((1, vectors[:2000]), (2, vectors[2000:])):
        part = faiss.clone_index(quantizer)
        part.add_with_ids(chunk, faiss_ids(seq, 0, len(chunk)))
        parts.append(part)
    dead = np.concatenate([faiss_ids(1, 0, 2000)[::3], faiss_ids(2, 0, 1000)[::5]])
    alive = {seq: ~np.isin(faiss_ids(seq, 0, n), dead) for seq, n in ((1, 2000), (2, 1000))}
    remap, rows = {}, 0
    for seq in (1, 2):
        remap[seq] = np.where(alive[seq], rows + np.cumsum(alive[seq]) - 1, -1)
        rows += int(alive[seq].sum())
    merged = copy_live_codes(
        [faiss.extract_index_ivf(p).invlists for p in parts], remap, 3, 8, faiss.extract_index_ivf(quantizer).code_size
    )
    compacted = faiss.clone_index(quantizer)
    compacted.replace_invlists(merged, False)
    compacted.ntotal = rows
    stacked = faiss.clone_index(quantizer)
    for part in parts:
        stacked.merge_from(faiss.clone_index(part), 0)
    params, _keep = search_parameters(stacked, 8, dead)
    queries = vectors[::50]
    scores, found = stacked.search(queries, 10, params=params)
    merged_params, _ = search_parameters(compacted, 8, np.empty(0, np.int64))
    merged_scores, merged_found = compacted.search(queries, 10, params=merged_params)
    assert np.allclose(scores, merged_scores)
    old = {
        int(faiss_ids(seq, r, 1)[0]): int(faiss_ids(3, remap[seq][r], 1)[0])
        for seq in (1, 2)
        for r in np.nonzero(alive[seq])[0]
    }
    assert [[old[i] for i in row] for row in found.tolist()] == merged_found.tolist()
    assert (merged_found >> SEQ_SHIFT == 3).all()


def test_delta_gate_reads_the_quantizers_fit_at_any_number_of_new_rows():
    """The drift measure of a delta build: rows like the training data fit as well whether there are 30 or 3,000
    of them; rows from elsewhere fit measurably worse and send the night to a full build."""
    import faiss

    from pipeline.build_index import blended, distortion, drifted

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32)).astype(np.float32)

    def draw(count: int, shift: float = 0.0) -> np.ndarray:
        points = centers[rng.integers(0, len(centers), count)] + 0.3 * rng.normal(size=(count, 32))
        return (points + shift * rng.normal(size=(1, 32))).astype(np.float32)

    index = faiss.index_factory(32, "OPQ8_32,IVF16,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    index.train(draw(4000))
    reference = distortion(index, draw(1000))
    assert 0 < reference < 1
    for count in (30, 300, 3000):
        measured = distortion(index, draw(count))
        assert abs(measured / reference - 1) < 0.15, (count, measured, reference)
        assert not drifted(reference, measured, 0.2)
    elsewhere = distortion(index, draw(300, shift=3.0))
    assert elsewhere > 1.5 * reference and drifted(reference, elsewhere, 0.2)
    assert drifted(None, reference, 0.2) and drifted(reference, None, 0.2)  # figures a version did not record
    assert distortion(index, np.empty((0, 32), np.float32)) == 0.0
    # A version of 30,000 rows: 300 ill-fitting rows a night move it a little, and night after night past the limit.
    version, nights = reference, 0
    while not drifted(reference, version, 0.2):
        version = blended(30_000, version, 300, elsewhere)
        nights += 1
    assert 3 <= nights <= 60, nights
    assert blended(30_000, None, 300, elsewhere) is None


def test_a_distributed_build_publishes_what_the_one_process_build_does(encoded):
    """Add tasks on the Ray cluster, one segment per group of shards: the same quantizer (same sample), the same
    recall, and every search answers with the same passages and scores as the one-segment build."""
    overrides = ["index.seed=5", "index.reuse_trained=false", "index.compact=never", "index.refine_k=150"]
    single = run_job("build_index", encoded["config"], *overrides)
    assert single.returncode == 0, single.stderr[-3000:]
    version, storage = single.summary["version"], encoded["storage"]
    one = load_published(storage, version, str(encoded["tmp"] / "cache-one"))
    queries = np.random.default_rng(0).normal(size=(50, one.d)).astype(np.float32)
    one_scores, one_ids = one.search(queries, 20)
    one_names = [one.passages(row).column("id").to_pylist() for row in one_ids]

    spread = run_job("build_index", encoded["config"], *overrides, "index.segment_vectors=300")
    assert spread.returncode == 0, spread.stderr[-3000:]
    summary = spread.summary
    assert summary["version"] != version  # cut into other segments: another version of the same passages
    assert summary["segments"] == 3 and summary["add_nodes"] >= 1 and summary["reused"] is False
    assert summary["recall_at_10"] == single.summary["recall_at_10"]
    assert summary["recall_at_100"] == single.summary["recall_at_100"]
    assert summary["refined_recall_at_10"] == single.summary["refined_recall_at_10"]  # merged from the tasks' lists
    assert summary["refined_recall_at_100"] == single.summary["refined_recall_at_100"]
    assert summary["distortion"] == single.summary["distortion"]
    many = load_published(storage, summary["version"], str(encoded["tmp"] / "cache-many"))
    assert [s.rows for s in many.manifest.segments] == [300, 300, 200]  # shards of 150 rows, grouped by 2
    assert many.manifest.quantizer == one.manifest.quantizer  # the same trained bytes
    assert many.live_ids()[1] == one.live_ids()[1]
    many_scores, many_ids = many.search(queries, 20)
    assert np.allclose(many_scores, one_scores, atol=1e-5)
    assert [many.passages(row).column("id").to_pylist() for row in many_ids] == one_names


def test_refine_orders_the_candidates_exactly_and_with_every_vector_is_exact_search(encoded):
    """index.refine_k: the build measures the recall refine gives; a search re-scores its IVF-PQ candidates by the
    exact inner product with the stored fp16 vectors; with every vector a candidate it is exact search."""
    run = run_job("build_index", encoded["config"], "index.refine_k=200", "index.seed=7")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    assert summary["refined_recall_at_10"] >= summary["recall_at_10"] - 0.01  # near-ties aside (fp16 copies)
    assert summary["refined_recall_at_100"] >= summary["recall_at_100"] - 0.01
    published = load_published(encoded["storage"], summary["version"], str(encoded["tmp"] / "cache-refine"))
    manifest = published.manifest
    assert manifest.refine_k == 200
    assert manifest.refined_recall_at_100 == pytest.approx(summary["refined_recall_at_100"], abs=1e-4)
    [(seq, stored)] = published.stored.items()
    table = np.asarray(stored, dtype=np.float32)  # the oracle: plain numpy over the same fp16 rows
    queries = np.random.default_rng(3).normal(size=(20, published.d)).astype(np.float32)
    _, candidates = published.search(queries, 200)
    scores, ids = published.search(queries, 10, refine_k=200)
    for query in range(len(queries)):
        found = candidates[query][candidates[query] >= 0]
        exact = table[found & ROW_MASK] @ queries[query]
        order = sorted(range(len(found)), key=lambda i: (-exact[i], found[i]))[:10]
        assert ids[query].tolist() == found[order].tolist()
        np.testing.assert_allclose(scores[query], exact[order], rtol=1e-5, atol=1e-5)
    # IVF4 at nprobe 4 probes every list: with every vector a candidate, refine is exact search
    _, everything = published.search(queries, 10, refine_k=published.vectors)
    brute = queries @ table.T
    expected = np.array([sorted(range(len(table)), key=lambda r: (-row[r], r))[:10] for row in brute])
    assert (everything == ((seq << 40) | expected)).all()

    plain = run_job("build_index", encoded["config"], "index.keep_vectors=false", "index.seed=7")
    assert plain.returncode == 0, plain.stderr[-3000:]
    without = load_published(encoded["storage"], plain.summary["version"], str(encoded["tmp"] / "cache-plain"))
    assert not without.stored and all(not e.name.endswith("vectors.npy") for e in without.manifest.files)
    with pytest.raises(PipelineError, match="keeps no vectors"):
        without.search(queries, 10, refine_k=50)


def test_refine_over_segments_merges_to_one_search():
    """The tasks' candidate lists, merged by IVF-PQ score and re-ordered by exact score, are what one refined
    search over the union returns."""
    rng = np.random.default_rng(1)
    ann = rng.normal(size=(5, 60)).astype(np.float32)
    exact = rng.normal(size=(5, 60)).astype(np.float32)
    ids = np.tile(np.arange(60), (5, 1))
    parts = []
    for cut in (slice(0, 25), slice(25, 60)):  # two segments, each sending its top 30 (IVF-PQ) candidates
        order = np.argsort(-ann[:, cut], axis=1)[:, :30]
        parts.append(tuple(np.take_along_axis(a[:, cut], order, axis=1) for a in (ann, ids, exact)))
    merged = refine_merged(parts, depth=30, k=10)
    for query in range(5):
        top = np.argsort(-ann[query])[:30]  # one search: the union's IVF-PQ top 30, then exact order
        assert merged[query].tolist() == top[np.argsort(-exact[query][top], kind="stable")][:10].tolist()


def test_the_driver_of_a_distributed_build_does_not_grow_with_the_corpus(tmp_path, ray_address):
    """At 10k and 40k vectors of 512 dims (IVF,Flat: 2 KiB of codes each), the one-process build's peak grows with
    the codes it holds; the distributed build's driver holds the sample and the queries only."""
    import shutil

    from tests.helpers import write_random_embeddings

    growth = {}
    for count in (10_000, 40_000):
        root = tmp_path / f"store-{count}"
        config = write_config(
            tmp_path / f"c{count}.yaml",
            {
                "storage": {"root": str(root)},
                "ingest": {
                    "input": str(write_tsv(tmp_path / f"p{count}.tsv", synthetic_rows(count, words=4))),
                    "snapshot": "s",
                    "shard_rows": 2500,
                },
                # the BM25 index too (index.lexical): written by a task of its own in the distributed build
                "index": {"factory": "IVF16,Flat", "nprobe": 16, "queries": 50, "train_size": 1000, "min_recall": 0.5},
            },
        )
        assert run_job("ingest", config).returncode == 0
        write_random_embeddings(str(root), {}, "s", dim=512)
        for mode, extra in (("one", []), ("spread", ["index.segment_vectors=5000"])):
            shutil.rmtree(root / "indexes", ignore_errors=True)
            run = run_job("build_index", config, *extra)
            assert run.returncode == 0, run.stderr[-3000:]
            assert run.summary["vectors"] == count and run.summary["segments"] == (
                1 if mode == "one" else count // 5000
            )
            growth.setdefault(mode, []).append(run.summary["driver_peak_rss"])
        storage = Storage(str(root), {})  # the BM25 task's index is published with the version: every passage
        manifest = storage.read_manifest(f"indexes/{run.summary['version']}", IndexManifest, name="manifest.json")
        searcher = load_lexical(storage, manifest, str(tmp_path / f"bm25-{count}")).index.searcher()
        assert searcher.num_docs == count
    one, spread = (growth[m][1] - growth[m][0] for m in ("one", "spread"))
    codes = 30_000 * (2048 + 8)
    assert one > 0.6 * codes, growth  # the test can tell: the one-process driver holds every code
    assert spread < 0.25 * codes, growth
