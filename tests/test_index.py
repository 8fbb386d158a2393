"""Index building end to end on the encode job's output (its pure planning: tests/unit/test_index_plan.py)."""

import json

import numpy as np
import pytest
import requests
import s3fs

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import kill_when_logged, run_job, write_config
from pipeline.errors import PipelineError
from pipeline.store.docstore import ROW_MASK
from pipeline.store.lexical import load_lexical
from pipeline.store.manifests import IndexManifest
from pipeline.store.published import load_published
from pipeline.store.storage import Storage

ROWS = synthetic_rows(800, words=30)


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
            "serve": {"reader_model": tiny_models["reader"]},  # the build stores its tokenizer's ids
        },
    )
    for job in ("ingest", "encode"):
        run = run_job(job, config)
        assert run.returncode == 0, run.stderr[-3000:]
    return {"config": config, "fs": fs, "storage": Storage("s3://idx/root", {"endpoint_url": s3_endpoint}), "tmp": tmp}


@pytest.fixture(scope="module")
def built(encoded) -> dict:
    """The version `jobs.build_index` publishes with the module's config (a rerun finds it: the name is a hash of
    its inputs), for the tests that damage or read a published version's files."""
    run = run_job("build_index", encoded["config"])
    assert run.returncode == 0, run.stderr[-3000:]
    return run.summary


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
    from pipeline.models.text_encoder import EncoderSettings, TextEncoder

    encoder = TextEncoder(EncoderSettings(manifest.encoder["model"], "dpr", max_length=64), device="cpu")
    vectors = encoder.encode([t for _, _, t in ROWS], [x for _, x, _ in ROWS])
    _, found = published.search(vectors, 1)
    found_ids = published.passages(found[:, 0]).column("id").to_pylist()
    assert np.mean([a == pid for a, (pid, _, _) in zip(found_ids, ROWS)]) >= 0.95

    # the reader's token ids of each passage, stored beside its docstore row; the footprint by kind
    from pipeline.models.tokens import ReaderTokenizer

    tokenizer = ReaderTokenizer(manifest.tokenizer["model"])
    assert manifest.tokenizer["fingerprint"] == published.store.tokenizer == tokenizer.fingerprint
    stored = published.store.token_ids(ids[::97])
    expected = tokenizer.table(published.passages(ids[::97]))
    assert [t.tolist() for t, _ in stored] == expected.column("title_ids").to_pylist()
    assert [x.tolist() for _, x in stored] == expected.column("text_ids").to_pylist()
    assert stored[0][1].dtype == np.uint16  # BERT's vocabulary fits
    footprint = summary["bytes_per_passage"]
    assert set(footprint) == {"codes", "vectors", "docstore", "token_ids", "bm25", "keys", "shared", "total"}
    assert footprint["keys"] == pytest.approx(8, abs=0.5)
    assert footprint["vectors"] == pytest.approx(published.d, abs=1)  # sq8: a byte a dimension
    assert footprint["token_ids"] > 0
    assert footprint["bm25"] < footprint["docstore"]  # the BM25 index holds no text

    again = run_job("build_index", encoded["config"])
    assert again.returncode == 0 and again.summary["reused"] is True
    assert again.summary["version"] == summary["version"] and again.summary["bytes_per_passage"] == footprint


def _mapped(directory) -> int:
    """How many memory maps of this process name a file under `directory`."""
    return sum(str(directory) in line for line in open("/proc/self/maps"))


def test_a_version_let_go_is_unmapped_and_twenty_loads_hold_what_one_does(encoded):
    """A replica loads a version a night and drops the one before: once nothing references a version, its
    segments' inverted lists are unmapped (faiss's wrapper leaves them unowned; left to it they stayed mapped, and
    a replica's RSS grew by a version's codes every night)."""
    import gc

    cache = encoded["tmp"] / "cache-unmapped"
    published = load_published(encoded["storage"], None, str(cache))
    once = _mapped(cache)
    assert once >= 3  # the inverted lists, the vectors and the docstore of its segment
    for _ in range(20):
        published = load_published(encoded["storage"], None, str(cache))
        assert published.search(np.ones((1, published.d), np.float32), 5)[1].shape == (1, 5)
    gc.collect()
    assert _mapped(cache) == once
    del published
    gc.collect()
    assert _mapped(cache) == 0


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
    assert "train" not in [line.split(": ")[-1] for line in run.stderr.splitlines() if "pipeline.index.job" in line]


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        (".faiss", "flip", ".faiss: checksum mismatch"),  # the shared quantizer
        ("ivf.bin", "flip", "ivf.bin: checksum mismatch"),  # a segment's inverted lists
        ("docstore.zst", "flip", "docstore.zst: checksum mismatch"),
        ("ivf.bin", "truncate", "ivf.bin: checksum mismatch"),
        ("vectors_sq8.npy", "flip", "vectors_sq8.npy: checksum mismatch"),  # the sq8 codes refine reads
        (".sq8.npy", "flip", ".sq8.npy: checksum mismatch"),  # and their quantizer
        ("reader_ids.zst", "flip", "reader_ids.zst: checksum mismatch"),  # the reader's token ids
        ("manifest.json", "truncate", "unreadable manifest"),
    ],
)
def test_tampered_files_are_refused_before_read_index(encoded, built, name, damage, expected):
    fs, version = encoded["fs"], built["version"]
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
def test_the_bm25_index_is_published_with_the_version_and_a_tampered_file_is_refused(encoded, built):
    fs, storage, version = encoded["fs"], encoded["storage"], built["version"]
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
    killed = kill_when_logged("build_index", encoded["config"], "pipeline.index.job: train…", *overrides)
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
        docs = sorted(lexical.store.passages(lexical.store.by_key(lexical.keys())).column("id").to_pylist())
        dense = {e.name: e.sha256 for e in manifest.files if e.name not in set(manifest.lexical.values())}
        return dense, docs

    first = published_files()
    fs.rm(f"idx/root/indexes/{version}", recursive=True)
    clean = run_job("build_index", encoded["config"], *overrides)
    assert clean.returncode == 0 and clean.summary["version"] == version and clean.summary["reused"] is False
    second = published_files()
    assert first == second and first[1] == sorted(pid for pid, _, _ in ROWS)
    kinds = sorted(name.rsplit("/", 1)[-1].rsplit(".", 1)[-1] for name in first[0])
    # inverted lists, quantizer, keys, sq8 codes and their quantizer, docstore and reader ids
    assert kinds == ["bin", "faiss", "npy", "npy", "npy", "zst", "zst"]
    if before is not None:
        fs.pipe_file("idx/root/indexes/LATEST", f"{before}\n".encode())


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
    inner product with the stored vectors (sq8 codes, decoded); with every vector a candidate it is exact search over
    them."""
    run = run_job("build_index", encoded["config"], "index.refine_k=200", "index.seed=7")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    assert summary["refined_recall_at_10"] >= summary["recall_at_10"] - 0.01  # near-ties aside (sq8 codes)
    assert summary["refined_recall_at_100"] >= summary["recall_at_100"] - 0.01
    published = load_published(encoded["storage"], summary["version"], str(encoded["tmp"] / "cache-refine"))
    manifest = published.manifest
    assert manifest.refine_k == 200
    assert manifest.refined_recall_at_100 == pytest.approx(summary["refined_recall_at_100"], abs=1e-4)
    [(seq, stored)] = published.stored.items()
    table = np.asarray(stored[np.arange(len(stored))], dtype=np.float32)  # the oracle: numpy over the same rows
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
    assert not without.stored and all("vectors" not in e.name for e in without.manifest.files)
    with pytest.raises(PipelineError, match="keeps no vectors"):
        without.search(queries, 10, refine_k=50)


def test_sq8_refine_codes_rank_as_fp16_vectors_do_but_where_scores_tie_within_a_quantization_step(encoded):
    """`index.refine_codes` sq8 (the default) against fp16, same quantizer and candidates: each question's refined
    top-10 is the same, or differs only between passages whose fp16 scores are closer than sq8 can tell apart (the
    sum over dimensions of |question| x the dimension's step: position by position, the passages the two lists put
    there score within it). The questions: 40 passages' own texts, encoded."""
    from pipeline.models.text_encoder import EncoderSettings, TextEncoder

    built = {}
    for codes in ("sq8", "fp16"):
        run = run_job(
            "build_index", encoded["config"], "index.refine_k=200", "index.seed=7", f"index.refine_codes={codes}"
        )
        assert run.returncode == 0, run.stderr[-3000:]
        built[codes] = load_published(encoded["storage"], run.summary["version"], str(encoded["tmp"] / f"c-{codes}"))
    sq8, fp16 = built["sq8"], built["fp16"]
    assert sq8.manifest.quantizer == fp16.manifest.quantizer and fp16.manifest.sq8 is None
    assert sq8.manifest.sq8 and all(not e.name.endswith("vectors.npy") for e in sq8.manifest.files)
    encoder = TextEncoder(EncoderSettings(sq8.manifest.encoder["model"], "dpr", max_length=64), device="cpu")
    questions = encoder.encode([t for _, _, t in ROWS[::20]], [x for _, x, _ in ROWS[::20]])
    _, by_sq8 = sq8.search(questions, 10, refine_k=200)
    _, by_fp16 = fp16.search(questions, 10, refine_k=200)
    [(seq, codes)] = sq8.stored.items()
    vectors = np.asarray(fp16.stored[seq], dtype=np.float32)
    step = codes.sq8.trained[1] / 255
    differing = []
    for number, (mine, theirs) in enumerate(zip(by_sq8, by_fp16)):
        if mine.tolist() == theirs.tolist():
            continue
        differing.append(number)
        scores = {int(i): float(vectors[i & ROW_MASK] @ questions[number]) for i in [*mine, *theirs]}
        tolerance = float(np.abs(questions[number]) @ step) + 1e-4
        for position, (a, b) in enumerate(zip(mine, theirs)):
            assert abs(scores[int(a)] - scores[int(b)]) <= tolerance, (number, position, scores, tolerance)
    # This corpus's 30 words from a 42-word vocabulary and a random tiny model put each top-10 within ~2 points, so
    # most orders swap a near-tied pair (27 of 40 questions); the passages themselves are nearly all the same.
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(by_sq8, by_fp16)])
    assert overlap >= 0.95, f"top-10 overlap {overlap}; questions whose top-10 differ: {differing}"


def test_a_train_task_runs_faiss_on_its_cpus_whatever_its_worker_ran_first(ray_address):
    """Ray sets OMP_NUM_THREADS from the first task a worker runs and OpenMP reads it once: a worker that began with
    a 1-CPU task trained a 2-CPU `train_sample`'s k-means on one thread (found by benchmarks/scale.py at 5M). Here
    the worker starts with OMP_NUM_THREADS=1, as such a worker has it."""
    import faiss
    import ray

    from pipeline.index.train import train_sample

    one_thread = {"env_vars": {"OMP_NUM_THREADS": "1"}}

    @ray.remote(num_cpus=2, runtime_env=one_thread)
    def faiss_threads() -> int:
        return faiss.omp_get_max_threads()

    joined = not ray.is_initialized()  # other modules join and leave the session's Ray themselves
    if joined:
        ray.init(address=ray_address, logging_level="WARNING", log_to_driver=False)
    try:
        assert ray.get(faiss_threads.remote()) == 1  # what the worker starts with, unchanged by Ray's own setting
        vectors = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
        task = ray.remote(train_sample).options(num_cpus=2, runtime_env=one_thread)
        fit = ray.get(task.remote("IVF8,Flat", 500, 0, False, None, vectors))
    finally:
        if joined:
            ray.shutdown()
    assert (fit.threads, len(fit.queries)) == (2, 100)


def test_the_driver_of_a_distributed_build_does_not_grow_with_the_corpus(tmp_path, ray_address):
    """At 10k and 40k vectors of 512 dims (IVF,Flat: 2 KiB of codes each), the one-process build's peak grows with
    the codes it holds; the distributed build's driver holds the sample and the queries only."""
    import shutil

    from kit.corpora import write_random_embeddings

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


def test_a_version_built_before_the_bm25_and_token_id_change_still_serves_the_same_answers(encoded, built, tmp_path):
    """A version as the release before published it (BM25 with id, title and text stored, `lexical_format` 1; no
    token ids): its sparse hits, read from tantivy's stored fields, equal the current version's, read from the
    docstores (positions were never part of BM25's scores), and its dense hits come without token ids."""
    from kit.legacy import format1_bm25
    from pipeline.store.lexical import object_name
    from pipeline.store.segments import TOKENS_FILE, upload_once

    storage, version = encoded["storage"], built["version"]
    current = load_published(storage, version, str(tmp_path / "cache"))
    ids, _ = current.live_ids()
    table = current.passages(ids)
    files = format1_bm25(tmp_path / "old", zip(*(table.column(c).to_pylist() for c in ("id", "title", "text"))))
    lexical = {name: upload_once(storage, path, object_name(name, path))[0] for name, path in files.items()}
    manifest = current.manifest
    kept = [e for e in manifest.files if e.name not in set(manifest.lexical.values()) and TOKENS_FILE not in e.name]
    old = manifest.model_copy(
        update={
            "version": f"{version}-old",
            "files": kept + list(lexical.values()),
            "lexical": {name: entry.name for name, entry in lexical.items()},
            "lexical_format": 1,
            "tokenizer": None,
        }
    )
    storage.write_manifest(f"indexes/{version}-old", old, name="manifest.json")

    questions = [text for _, text, _ in ROWS[:40:4]]
    new_hits = load_lexical(storage, manifest, str(tmp_path / "cache")).search(questions, 10)
    old_hits = load_lexical(storage, old, str(tmp_path / "cache-old")).search(questions, 10)
    assert [[(h["id"], h["title"], h["text"]) for h in q] for q in old_hits] == [
        [(h["id"], h["title"], h["text"]) for h in q] for q in new_hits
    ]
    assert np.allclose([h["score"] for q in old_hits for h in q], [h["score"] for q in new_hits for h in q])
    assert all("text_ids" in h for q in new_hits for h in q) and not any("text_ids" in h for q in old_hits for h in q)
    published = load_published(storage, f"{version}-old", str(tmp_path / "cache-old"))
    assert published.store.token_ids(ids[:3]) == [None] * 3  # the reader tokenizes these passages itself
