"""The encoders and the reader on one GPU, in one command: no Ray, no FAISS, nothing from the hub; one JSON line.

    python -m benchmarks.gpu            # BERT-base DPR models at random weights on the GPU (about 3 minutes)
    python -m benchmarks.gpu --quick    # the same code on CPU with tiny models, in seconds (CI runs it)

Measured (all through the project's own code: `pipeline.models.text_encoder.TextEncoder`, `PassageTokenizer`,
`pipeline.models.reader.SpanReader`):
- context encoder: passages/s of `encode_tokens` (bf16 autocast, token-budget batches) at three `batch_tokens`,
  over passages whose token lengths follow psgs_w100 (title + text: median 140, p95 256 BERT tokens), vs DPR's
  `generate_dense_embeddings` loop (pad to 256, batch 32, in order; fp32 and fp16); achieved TFLOP/s counted on
  real tokens (padding excluded) and its fraction of the GPU's dense bf16 peak (datasheet, and a measured matmul);
- the same with the weights cast to bf16 (`encode.cast_weights`) instead of autocast, and packed without padding
  (`pipeline.models.packed`: FlashAttention's variable-length kernel, linear layers on real tokens only);
- bf16 vs fp32 parity on 2,000 passages: minimum cosine, raw and after removing the mean vector (a random BERT maps
  every passage near one direction, which flatters the raw cosine); and on 1,000 real passages, the overlap of each
  of 100 passages' 10 nearest by bf16 and by fp32 vectors;
- tokenization: passages/s on one pinned CPU core (a child process, fast tokenizer, title/text pairs of real
  100-word passages), and so the tokenizer cores one GPU needs;
- question encoder: p50 latency at batch 1, questions/s at batch 64 (tokenization included);
- DPR reader: questions/s with 100 passages each at max_length 256, bf16, batches of 1 and 8 questions (Serve's
  batch), fed the passages' token ids as a build stores them, span selection included; and per question the
  milliseconds of assemble, forward and spans before (tokenizing every passage, `decode_best_spans`) and after.
The JSON is also written to `$OUT/gpu.json` when OUT is set. The vocabulary is BERT uncased
(`benchmarks/assets/bert-base-uncased-vocab.txt`, Apache-2.0), as in the DPR checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.ingest.demo_corpus import real_passages, word_questions

REPO = Path(__file__).resolve().parents[1]  # runs on a GPU machine from the repository alone: no kit

log = logging.getLogger("benchmarks.gpu")
VOCAB = REPO / "benchmarks" / "assets" / "bert-base-uncased-vocab.txt"
CLS, SEP, FIRST_WORD = 101, 102, 1996  # BERT uncased: ids below 1996 are special tokens and single characters
# Dense bf16 tensor-core peak (TFLOP/s) from the datasheets, by device-name fragment.
DATASHEET_BF16 = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.5,
    "A100": 312.0,
    "L40S": 362.05,
    "L4": 121.0,
    "A10G": 70.0,
}

FULL = dict(
    passages=200_000,
    shard=50_000,
    batch_tokens=(65536, 131072, 262144),
    max_batch_size=2048,
    dpr_fp32=10_000,
    dpr_fp16=50_000,
    parity=2_000,
    tokenize=20_000,
    questions=300,
    question_batches=40,
    reader_rounds=8,
    matmul=8192,
)
QUICK = dict(
    passages=1_000,
    shard=500,
    batch_tokens=(2048, 4096, 8192),
    max_batch_size=512,
    dpr_fp32=256,
    dpr_fp16=256,
    parity=200,
    tokenize=1_000,
    questions=20,
    question_batches=3,
    reader_rounds=1,
    matmul=256,
    # torch.compile's graph capture without inductor's code generation, which takes 27 s on a 2-core CPU: the
    # compiled path is exercised, its speed is not what a quick run measures
    compile_backend="aot_eager",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models on CPU: checks the script in seconds")
    parser.add_argument("--commit", default=os.environ.get("GIT_COMMIT"), help="recorded in the JSON")
    parser.add_argument("--tokenize-only", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    sizes = QUICK if args.quick else FULL
    if args.tokenize_only:
        print(json.dumps(tokenize_on_one_core(args.tokenize_only, sizes["tokenize"])))
        return
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    started = time.perf_counter()
    result = describe(device, args)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        models = build_models(Path(tmp), tiny=args.quick)
        # A lent GPU is scarce: one part that fails is recorded and the others still run.
        for name, measure in (
            ("peak", lambda: peak_flops(device, sizes["matmul"])),
            ("context", lambda: context_encoder(models["ctx"], device, sizes, result)),
            ("tokenizer", lambda: tokenizer_rate(models["ctx"], args.quick, result)),
            ("question", lambda: question_encoder(models["question"], device, sizes)),
            ("reader", lambda: reader(models["reader"], device, sizes)),
        ):
            try:
                result.update(measure())
            except Exception as error:  # noqa: BLE001 - recorded in the JSON, exit status 1
                log.exception("%s failed", name)
                result[f"{name}_error"] = f"{type(error).__name__}: {error}"[:500]
            if os.environ.get("OUT"):  # what is measured so far survives a run cut off at its time limit
                Path(os.environ["OUT"], "gpu.partial.json").write_text(json.dumps(result) + "\n")
    result["seconds"] = round(time.perf_counter() - started, 1)
    line = json.dumps(result)
    print(line)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(line + "\n")
    if any(key.endswith("_error") for key in result):
        sys.exit(1)


def describe(device: torch.device, args) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "benchmark": "gpu",
        "quick": args.quick,
        "device": name,
        "date": datetime.date.today().isoformat(),
        "commit": args.commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }


def build_models(root: Path, tiny: bool) -> dict[str, str]:
    """DPR context encoder, question encoder and reader at random weights, saved and then loaded by the code
    under test through `from_pretrained`: BERT-base (facebook/dpr-*-single-nq-base's configuration) or tiny."""
    from transformers import BertTokenizerFast, DPRConfig, DPRContextEncoder, DPRQuestionEncoder, DPRReader

    tokenizer = BertTokenizerFast(vocab_file=str(VOCAB), do_lower_case=True)
    config = (
        DPRConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        if tiny
        else DPRConfig()
    )  # vocab 30522, 768 hidden, 12 layers, 12 heads, 3072 intermediate, no projection
    paths = {}
    for seed, (name, model_class) in enumerate(
        (("ctx", DPRContextEncoder), ("question", DPRQuestionEncoder), ("reader", DPRReader))
    ):
        torch.manual_seed(seed)
        path = root / name
        model_class(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    log.info("built %s DPR models in %s", "tiny" if tiny else "BERT-base", root)
    return paths


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_flops(device: torch.device, size: int) -> dict:
    """A large bf16 matrix product on random data: the ceiling this card reaches here, beside the datasheet's."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = timed(device, lambda: [a @ b for _ in range(10)]) / 10
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    datasheet = next((peak for key, peak in DATASHEET_BF16.items() if key in name), None)
    return {"matmul_tflops": round(2 * size**3 / seconds / 1e12, 3), "datasheet_bf16_tflops": datasheet}


def psgs_w100_lengths(count: int, seed: int = 0) -> np.ndarray:
    """BERT token counts of psgs_w100 passages (title [SEP] 100 words): lognormal, median 140, p95 256, cut at
    DPR's max_length 256."""
    sigma = math.log(256 / 140) / 1.645
    lengths = np.random.default_rng(seed).lognormal(math.log(140), sigma, count)
    return np.clip(np.rint(lengths), 16, 256).astype(np.int64)


def random_tokens(lengths: np.ndarray, seed: int = 1):
    """[CLS] words [SEP] at the given lengths, word ids drawn uniformly from the vocabulary."""
    from pipeline.models.text_encoder import Tokens

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.random.default_rng(seed).integers(FIRST_WORD, 30522, int(offsets[-1]), dtype=np.int32)
    ids[offsets[:-1]] = CLS
    ids[offsets[1:] - 1] = SEP
    return Tokens(ids, offsets)


def subset(tokens, count: int):
    from pipeline.models.text_encoder import Tokens

    return Tokens(tokens.input_ids[: tokens.offsets[count]], tokens.offsets[: count + 1])


def shards(tokens, size: int):
    from pipeline.models.text_encoder import Tokens

    for start in range(0, len(tokens), size):
        end = min(start + size, len(tokens))
        offsets = tokens.offsets[start : end + 1]
        yield Tokens(tokens.input_ids[offsets[0] : offsets[-1]], offsets - offsets[0])


def flops_per_passage(config, lengths: np.ndarray) -> np.ndarray:
    """Forward FLOPs on real tokens: 2 x the layers' weights per token, plus attention scores and mixing
    (4 x length x hidden per token per layer). Embeddings and the pooler are negligible."""
    d, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_token = 2 * layers * (4 * d * d + 2 * d * inner)
    return lengths * per_token + layers * 4 * lengths.astype(np.float64) ** 2 * d


def context_encoder(model_dir: str, device: torch.device, sizes: dict, result: dict) -> dict:
    """bf16 both ways: autocast over fp32 weights (LayerNorms and residuals in fp32) and weights cast to bf16."""
    from pipeline.models.packed import PackedTextEncoder
    from pipeline.models.text_encoder import EncoderSettings, TextEncoder

    lengths = psgs_w100_lengths(sizes["passages"])
    tokens = random_tokens(lengths)
    encoders = {
        mode: kind(
            EncoderSettings(model=model_dir, dtype="bfloat16", cast_weights=cast),
            device=device,
            max_batch_size=sizes["max_batch_size"],
            compile=compiled,
        )
        for mode, kind, cast, compiled in (
            ("autocast", TextEncoder, False, False),
            ("bf16_weights", TextEncoder, True, False),
            ("bf16_weights_compiled", TextEncoder, True, True),
            # no padding: FlashAttention's varlen kernel, every linear layer on real tokens only
            # (pipeline.models.packed)
            ("bf16_weights_packed", PackedTextEncoder, True, False),
        )
    }
    if "compile_backend" in sizes:
        compiled = encoders["bf16_weights_compiled"]
        compiled.forward = torch.compile(compiled.model, dynamic=True, backend=sizes["compile_backend"])
    total_flops = float(flops_per_passage(encoders["autocast"].model.config, lengths).sum())
    peak = result.get("datasheet_bf16_tflops") or result.get("matmul_tflops") or math.nan
    out = {
        "passages": len(tokens),
        "tokens_median": int(np.median(lengths)),
        "tokens_p95": int(np.percentile(lengths, 95)),
        "tokens_mean": round(float(lengths.mean()), 1),
        "max_batch_size": sizes["max_batch_size"],
        "encoder": {},
    }
    best = None
    for mode, encoder in encoders.items():
        for batch_tokens in sizes["batch_tokens"]:
            encoder.batch_tokens = batch_tokens
            warm_up = subset(tokens, min(2_000, len(tokens)))  # kernels, allocator, and torch.compile's graph
            first = timed(device, lambda e=encoder, w=warm_up: e.encode_tokens(w))
            out.setdefault("first_call_seconds", {}).setdefault(mode, round(first, 2))
            seconds = timed(
                device, lambda e=encoder: [e.encode_tokens(shard) for shard in shards(tokens, sizes["shard"])]
            )
            tflops = total_flops / seconds / 1e12
            figures = {
                "passages_per_s": round(len(tokens) / seconds, 1),
                "tflops": round(tflops, 4),
                "peak_fraction": round(tflops / peak, 3),
                "matmul_fraction": round(tflops / result.get("matmul_tflops", math.nan), 3),
            }
            out["encoder"][f"{mode}_{batch_tokens}"] = figures
            log.info("encoder %s batch_tokens %d: %s", mode, batch_tokens, figures)
            if best is None or figures["passages_per_s"] > best[1]["passages_per_s"]:
                best = (f"{mode}_{batch_tokens}", figures)
    out["encoder_best"] = best[0]
    out["encoder_passages_per_s"] = best[1]["passages_per_s"]
    out["encoder_peak_fraction"] = best[1]["peak_fraction"]

    model = encoders["autocast"].model
    for name, dtype, count in (("fp32", torch.float32, sizes["dpr_fp32"]), ("fp16", torch.float16, sizes["dpr_fp16"])):
        loop_model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        rate = dpr_loop_rate(loop_model, subset(tokens, count), device)
        out[f"dpr_loop_{name}_passages_per_s"] = round(rate, 1)
        out[f"speedup_vs_dpr_{name}"] = round(out["encoder_passages_per_s"] / rate, 2)
        log.info("DPR loop %s: %.1f passages/s over %d passages", name, rate, count)
        del loop_model
    fp32 = TextEncoder(EncoderSettings(model=model_dir, dtype="float32"), device=device)
    real = fp32.tokenize(*real_passages(min(sizes["parity"], 1_000)))  # the demo corpus: ~1,050 distinct passages
    for mode, encoder in encoders.items():
        figures = parity(encoder, fp32, subset(tokens, sizes["parity"]))
        figures["top10_overlap"] = top10_overlap(encoder.encode_tokens(real), fp32.encode_tokens(real))
        out.update({f"{key}_{mode}": value for key, value in figures.items()})
    out["parity_passages"] = sizes["parity"]
    return out


def top10_overlap(low: np.ndarray, high: np.ndarray, queries: int = 100) -> float:
    """Each of the first `queries` real passages' 10 nearest passages (inner product, the fp32 mean vector removed
    from both, as a random BERT maps every passage near one direction) by the bf16 vectors and by the fp32 ones:
    the mean fraction shared. The goal is >= 0.99."""
    count, mean = min(queries, len(high)), high.mean(axis=0)
    nearest = [np.argsort(-(v[:count] @ v.T), axis=1, kind="stable")[:, :10] for v in (low - mean, high - mean)]
    return round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(*nearest)])), 4)


def dpr_loop_rate(model, tokens, device: torch.device, batch: int = 32, length: int = 256) -> float:
    """DPR's generate_dense_embeddings: every passage padded to 256, batches of 32 in input order, each batch's
    vectors copied to the host. Token ids are padded once up front (DPR pads per batch: this only flatters it)."""
    ids = np.zeros((len(tokens), length), dtype=np.int64)
    for row, (start, end) in enumerate(zip(tokens.offsets[:-1], tokens.offsets[1:])):
        ids[row, : end - start] = tokens.input_ids[start:end]
    ids_t = torch.from_numpy(ids)
    mask_t = (ids_t != 0).long()

    def run(rows: int) -> None:
        with torch.inference_mode():
            for start in range(0, rows, batch):
                inputs = {
                    "input_ids": ids_t[start : start + batch].to(device),
                    "attention_mask": mask_t[start : start + batch].to(device),
                }
                inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
                model(**inputs).pooler_output.float().cpu()

    run(min(4 * batch, len(tokens)))  # warm-up
    return len(tokens) / timed(device, lambda: run(len(tokens)))


def parity(bf16, fp32, tokens) -> dict:
    """Cosine between each passage's bf16 and fp32 vectors: raw, and with the fp32 mean vector removed from both."""
    low, high = bf16.encode_tokens(tokens), fp32.encode_tokens(tokens)

    def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    mean = high.mean(axis=0)
    return {
        "bf16_min_cosine": round(float(cosines(low, high).min()), 6),
        "bf16_min_cosine_centered": round(float(cosines(low - mean, high - mean).min()), 6),
    }


def tokenize_on_one_core(model_dir: str, count: int) -> dict:
    """In a child process pinned to one core (the tokenizer's own threads off): what one tokenizer actor does."""
    from pipeline.models.text_encoder import EncoderSettings, PassageTokenizer

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    tokenizer = PassageTokenizer(EncoderSettings(model=model_dir))
    titles, texts = real_passages(count)
    tokenizer(titles[:1000], texts[:1000])  # warm-up
    start, total = time.perf_counter(), 0
    for i in range(0, count, 1000):
        total += int(tokenizer(titles[i : i + 1000], texts[i : i + 1000]).lengths.sum())
    seconds = time.perf_counter() - start
    return {"tokenizer_passages_per_s": round(count / seconds, 1), "tokenizer_tokens_mean": round(total / count, 1)}


def tokenizer_rate(model_dir: str, quick: bool, result: dict) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, "--tokenize-only", model_dir] + (["--quick"] if quick else [])
    child = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"tokenizer child failed ({child.returncode}): {child.stderr[-2000:]}")
    out = json.loads(child.stdout.strip().splitlines()[-1])
    if "encoder_passages_per_s" in result:
        out["tokenizer_cores_per_gpu"] = math.ceil(result["encoder_passages_per_s"] / out["tokenizer_passages_per_s"])
    log.info("tokenizer on one core: %s", out)
    return out


def question_encoder(model_dir: str, device: torch.device, sizes: dict) -> dict:
    from pipeline.models.text_encoder import EncoderSettings, TextEncoder

    encoder = TextEncoder(EncoderSettings(model=model_dir, question=True), device=device)
    asked = word_questions(max(sizes["questions"], 64 * sizes["question_batches"]))
    for question in asked[:10]:
        encoder.encode(None, [question])  # warm-up
    latencies = []
    for question in asked[: sizes["questions"]]:
        latencies.append(timed(device, lambda q=question: encoder.encode(None, [q])))
    batches = [asked[i * 64 : (i + 1) * 64] for i in range(sizes["question_batches"])]
    encoder.encode(None, batches[0])
    seconds = timed(device, lambda: [encoder.encode(None, batch) for batch in batches])
    out = {
        "question_p50_ms": round(1000 * float(np.median(latencies)), 2),
        "question_batch64_per_s": round(64 * len(batches) / seconds, 1),
    }
    log.info("question encoder: %s", out)
    return out


def reader(model_dir: str, device: torch.device, sizes: dict) -> dict:
    """Questions/s with 100 passages each, fed the token ids a build stores; and per question, the milliseconds of
    assemble, forward and spans before (tokenize every passage, `decode_best_spans`) and after
    (`benchmarks.reader.measure`)."""
    from benchmarks.reader import measure, requests_for
    from pipeline.models.reader import SpanReader

    span_reader = SpanReader(model_dir, max_length=256, max_answer_tokens=10, device=device)
    count = 8 * sizes["reader_rounds"]
    out = {"reader_passages": 100, "reader_max_length": 256, "reader_dtype": str(span_reader.compute_dtype)}
    split = measure(span_reader, 100, count)
    out["reader_ms_before"], out["reader_ms_after"] = split["before_ms"], split["after_ms"]
    _, requests = requests_for(span_reader, count, 100)
    for batch in (1, 8):
        span_reader.read(requests[:batch])  # warm-up
        groups = [requests[i : i + batch] for i in range(0, len(requests), batch)]
        seconds = timed(device, lambda g=groups: [span_reader.read(group) for group in g])
        out[f"reader_batch{batch}_questions_per_s"] = round(len(requests) / seconds, 2)
    log.info("reader: %s", out)
    return out


if __name__ == "__main__":
    main()
