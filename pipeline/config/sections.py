"""The sections of the deployment YAML (`pipeline.config` loads it): a typed model per stage, each setting with
its type, default, bounds and description (`docs/configuration.md` is written from them by `python -m jobs.docs`).
Unknown keys are errors: a typo must never silently fall back to a default on a 21M-passage run.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# storage.options may configure endpoints, regions, retries; never credentials (they would end up in configs,
# job arguments and dashboards). Credentials come from the environment or the AWS/GCP default chains.
CREDENTIAL_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key",
        "secret_key",
        "session_token",
        "client_secret",
        "credentials",
        "token_file",
    }
)


def _today() -> str:
    """today's date, as 2026-11-26"""
    return dt.date.today().isoformat()


def _find_credential_key(options: Any, prefix: str = "") -> str | None:
    if isinstance(options, dict):
        for key, value in options.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if str(key).lower() in CREDENTIAL_KEYS:
                return dotted
            found = _find_credential_key(value, dotted)
            if found:
                return found
    return None


def _absolute(value: Any) -> Any:
    """A local path made absolute where the config is loaded: Ray workers do not share the driver's working
    directory, so a relative `.demo/store` would name another place in each of them. URLs stay as written."""
    if isinstance(value, str) and value and "://" not in value:
        return os.path.abspath(os.path.expanduser(value))
    return value


def _snapshot_name(value: Any) -> Any:
    """Snapshot names are path components; YAML turns 2026-11-26 into a date, which is meant as its name."""
    if isinstance(value, dt.date):
        value = value.isoformat()
    if isinstance(value, str) and not SNAPSHOT_NAME.match(value):
        raise ValueError(f"snapshot name {value!r} must match {SNAPSHOT_NAME.pattern}")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    """Where every stage reads and writes: one root (local path, `s3://`, `gs://`) for passages, embeddings, index
    versions and the nightly history."""

    root: str = Field(
        description="URL or path under which everything is written (s3://bucket/prefix, /tmp/x; a relative path is "
        "taken from the working directory)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage_options, no credentials")
    _root = field_validator("root")(lambda cls, value: _absolute(value))

    @field_validator("options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        found = _find_credential_key(options)
        if found:
            raise ValueError(
                f"'{found}' looks like a credential; credentials come from the environment "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, instance roles), never from the config"
            )
        return options


class IngestConfig(Section):
    """Passage files to a Parquet passage snapshot (`jobs.ingest`, the nightly's first stage): full, or a delta on
    the last one."""

    input: str | None = Field(None, description="URL/path/glob of .tsv(.gz), .jsonl(.gz) or .parquet files")
    _input = field_validator("input")(lambda cls, value: _absolute(value))
    snapshot: str = Field(default_factory=_today, description="name of the passage snapshot to write")
    format: Literal["auto", "tsv", "jsonl", "parquet"] = Field(
        "auto", description="the input files' format (auto: from each file's extension, .gz looked through)"
    )
    shard_rows: int = Field(100_000, gt=0, description="passages per Parquet shard")
    max_text_chars: int = Field(100_000, gt=0, description="longer passages are rejected as bad input")
    max_bad_rows: int = Field(
        0,
        ge=0,
        description="bad rows skipped and listed in the manifest's quarantine (0 = the first bad row fails the run)",
    )
    parallel: Literal["auto", "always", "never"] = Field(
        "auto", description="read files in Ray tasks: auto = when the input has more than one file"
    )
    base: str | None = Field(
        None,
        description="write a delta on this snapshot: only new and changed rows, and "
        "tombstones for the ids removed since (null = a full snapshot)",
    )

    _snapshot = field_validator("snapshot", "base", mode="before")(lambda cls, value: _snapshot_name(value))


class EncodeConfig(Section):
    """The DPR context encoder over a snapshot's passages on a Ray actor pool (`jobs.encode`): the model, its
    batching, and how failures are retried."""

    snapshot: str | None = Field(None, description="snapshot to encode (default: the latest ingested)")
    _snapshot = field_validator("snapshot", mode="before")(lambda cls, value: _snapshot_name(value))
    model: str = Field(
        "facebook/dpr-ctx_encoder-single-nq-base",
        description="HF name, local or remote path, or python-package:NAME for a model shipped in a package",
    )
    question_model: str | None = Field(
        None,
        description="the question encoder paired with `model` (a DPR context encoder and its question encoder are "
        "two checkpoints): recorded in each index version's manifest, so Serve and evaluate encode questions with "
        "the version's own (null: serve.question_model)",
    )
    pooling: Literal["dpr", "cls", "mean"] = Field(
        "dpr",
        description="dpr: DPRContextEncoder's pooler_output; cls / mean: a BERT-family encoder's [CLS] or mean state",
    )
    normalize: bool = Field(False, description="L2-normalize embeddings (for models trained with cosine)")
    max_length: int = Field(256, gt=0, description="tokens per passage (title [SEP] text), longer ones cut as DPR does")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype: auto = bf16 (fp16 without bf16) autocast on GPU, fp32 on CPU"
    )
    cast_weights: bool = Field(
        True,
        description="run the weights in bf16/fp16 rather than autocast over fp32 "
        "weights (GPU: 1.45x the passages/s, min cosine 0.9999 vs fp32; no effect in fp32)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the encoder in each actor: on an H100 1.10x the passages/s after a first "
        "call of about 50 s, so it pays off from about 7M passages per GPU (a full re-encode, not a nightly delta)",
    )
    batch_tokens: int | None = Field(
        None, gt=0, description="padded tokens per forward pass (default: 65536 on GPU, 4096 on CPU)"
    )
    max_batch_size: int = Field(
        512, gt=0, description="passages per forward pass at most, whatever batch_tokens allows"
    )
    embedding_dtype: Literal["float32", "float16"] = Field(
        "float32", description="how embedding shards store the vectors (float16 halves them)"
    )
    actors: int | None = Field(None, gt=0, description="encoder actors (default: one per GPU, else one on CPU)")
    cpu_threads: int | None = Field(None, gt=0, description="torch threads of a CPU actor (default: node CPUs)")
    tokenizer_actors: int | None = Field(
        None,
        ge=0,
        description="CPU actors that read and tokenize shards for GPU actors (default: 6 per GPU "
        "actor; 0 without GPUs, where encoder actors tokenize themselves)",
    )
    start_timeout_s: float = Field(
        900,
        gt=0,
        description="how long the job waits for its actors to start (an autoscaler may add nodes meanwhile); past "
        "it, the job fails saying what it asked for and what the cluster has free",
    )
    max_attempts: int = Field(3, gt=0, description="tries per shard when an encoder actor dies")
    max_bad_shards: int = Field(
        0,
        ge=0,
        description="corrupt, empty, wrong-schema or oversized passage shards "
        "skipped and listed as quarantined (0 = the first fails the run)",
    )
    max_shard_bytes: ByteSize = Field(2 * 2**30, gt=0, description="a passage shard larger than this is refused unread")
    carry_over: bool = Field(
        True,
        description="copy the vectors of unchanged passages (same id, content hash and "
        "encoder fingerprint) from the previous snapshot instead of encoding",
    )
    previous_snapshot: str | None = Field(
        None, description="snapshot to carry vectors from (default: the one the published index was built from)"
    )
    _previous = field_validator("previous_snapshot", mode="before")(lambda cls, value: _snapshot_name(value))


class IndexConfig(Section):
    """The FAISS IVF-PQ index version built from the embeddings (`jobs.build_index`, `jobs.compact`): its factory,
    the recall gate, segments, compaction and the BM25 index beside it."""

    snapshot: str | None = Field(None, description="passage snapshot (default: the latest ingested)")
    fingerprint: str | None = Field(None, description="encoder fingerprint (default: newest encode of the snapshot)")
    _snapshot = field_validator("snapshot", mode="before")(lambda cls, value: _snapshot_name(value))
    factory: str = Field("OPQ64_256,IVF65536,PQ64", description="FAISS factory string; inner-product metric")
    nprobe: int = Field(64, gt=0, description="search-time nprobe, stored with the index")
    train_size: int = Field(1_000_000, gt=0, description="cap on training vectors (>= 39 per centroid wanted)")
    queries: int = Field(1000, gt=0, description="held-out corpus vectors used to measure recall vs exact search")
    min_recall: float = Field(
        0.9, ge=0, le=1, description="recall@100 below this is not published (refined recall with refine_k)"
    )
    keep_vectors: bool = Field(
        True,
        description="store each segment's vectors beside its codes (on the replicas' disks, read through the page "
        "cache) so searches can re-score their candidates (refine_k)",
    )
    refine_codes: Literal["sq8", "fp16"] = Field(
        "sq8",
        description="how the kept vectors are stored: sq8 (1 byte x dim, an 8-bit scalar quantizer trained with "
        "the version's quantizer; refined recall within 0.1 point of fp16's) or fp16 (2 bytes x dim)",
    )
    reader_ids: bool = Field(
        True,
        description="store each passage's token ids for serve.reader_model's tokenizer beside its docstore (2 bytes "
        "a token), so the reader assembles its inputs from ids instead of tokenizing its passages per question",
    )
    lexical: bool = Field(
        True,
        description="also build a BM25 index (tantivy) of the same passages, versioned with the dense one, for "
        "sparse and hybrid search; a nightly adds its passages as a new segment and deletes the ones it replaces",
    )
    refine_k: int = Field(
        0,
        ge=0,
        description="IVF-PQ candidates re-scored exactly per search (e.g. 4 x k; 0 = off): the build measures "
        "recall with it and records it, and Serve and jobs.evaluate use it unless they set their own",
    )
    max_memory: ByteSize = Field(32 * 2**30, gt=0, description="refuse to build when the estimate exceeds this")
    seed: int = Field(
        0, description="seed of the training sample, the held-out recall queries and k-means: a rebuild is reproducible"
    )
    reuse_trained: bool = Field(
        True,
        description="add to the published index's trained quantizer (same encoder "
        "and factory) while its recall stays at min_recall; else retrain",
    )
    max_drift: float = Field(
        0.2,
        ge=0,
        description="a delta build adds to the published quantizer while the version's relative quantization error "
        "(its rows at their recorded error, the new rows measured) stays within this fraction above the error "
        "measured with the last recall; beyond it a full build measures recall again",
    )
    segment_vectors: int | None = Field(
        None,
        gt=0,
        description="build on the Ray cluster: one add task per group of embedding shards of at most this many "
        "vectors, each writing its own segment (bounds a task's memory); null = add in the job's own process",
    )
    add_cpus: float = Field(1, gt=0, description="CPUs per add task (faiss threads)")
    add_gpus: float = Field(0, ge=0, description="GPUs per add task: coarse assignment runs on them (faiss GPU build)")
    train_cpus: float = Field(1, gt=0, description="CPUs of the distributed build's training task (faiss threads)")
    train_gpus: float = Field(
        0, ge=0, description="GPUs of the distributed build's training task: k-means runs on them (faiss GPU build)"
    )
    max_segments: int = Field(
        8, gt=0, description="small segments (under half of segment_vectors) a version may list before they are merged"
    )
    max_tombstone_fraction: float = Field(
        0.2,
        gt=0,
        le=1,
        description="dead rows (deleted or replaced) a version may carry, as a fraction, before merging",
    )
    compact: Literal["auto", "always", "never"] = Field(
        "auto", description="merge segments past the two limits above (auto), now (always) or never"
    )

    @model_validator(mode="after")
    def _refine_needs_vectors(self) -> IndexConfig:
        if self.refine_k and not self.keep_vectors:
            raise ValueError("refine_k re-scores with the stored vectors: set keep_vectors true, or refine_k 0")
        return self


class Autoscaling(Section):
    """Ray Serve's `autoscaling_config` for one part of the QA app: replicas between `min_replicas` and
    `max_replicas`, sized so that each has about `target_ongoing_requests` calls in flight or queued."""

    min_replicas: int = Field(1, ge=1, description="a versioned part needs a replica holding the version")
    max_replicas: int = Field(gt=0, description="the most replicas the part scales up to")
    initial_replicas: int | None = Field(None, ge=1, description="replicas at deploy (null: min_replicas)")
    target_ongoing_requests: float = Field(
        2,
        gt=0,
        description="calls in flight per replica to aim at; the ingress sends the question encoder and each shard "
        "one call per batch, so below 1 there (e.g. 0.5: a second replica once batches are back to back)",
    )
    upscale_delay_s: float = Field(30, ge=0, description="how long the load stays high before a replica is added")
    downscale_delay_s: float = Field(600, ge=0, description="how long the load stays low before a replica is removed")
    metrics_interval_s: float = Field(10, gt=0, description="how often replicas report their load")
    look_back_period_s: float = Field(30, gt=0, description="the window the load is averaged over")

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        initial = self.initial_replicas if self.initial_replicas is not None else self.min_replicas
        if not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"replicas must satisfy min_replicas ({self.min_replicas}) <= initial_replicas ({initial}) <= "
                f"max_replicas ({self.max_replicas})"
            )
        return self


AUTOSCALED = Literal["ingress", "encoder", "retriever", "lexical", "reader"]


class ServeConfig(Section):
    """The Ray Serve QA app (`pipeline.serve.app`): the question encoder and reader models, the HTTP limits, each
    part's replicas and resources, hybrid fusion and the node cache."""

    question_model: str = Field(
        "facebook/dpr-question_encoder-single-nq-base",
        description="question encoder for index versions whose manifest records none (encode.question_model)",
    )
    question_pooling: Literal["dpr", "cls", "mean"] | None = Field(
        None, description="default: the pooling (and normalization) the index's passages were encoded with"
    )
    reader_model: str | None = Field("facebook/dpr-reader-single-nq-base", description="null = retrieval only")
    index_version: str | None = Field(
        None,
        description="version to serve (default: indexes/LATEST when the app starts); the default of the ingress's "
        "user_config, where `serve deploy` pins, rolls back and the nightly moves the whole app",
    )
    cache_dir: str = Field(
        "/tmp/dpr-pipeline-index-cache",
        description="the node's verified copies of index versions, shared by every replica on the node (and by "
        "jobs.evaluate when its cache_dir is the same)",
    )
    cache_max_bytes: ByteSize | None = Field(
        None,
        gt=0,
        description="the node cache's budget: beyond it, files of versions no process on the node holds go, least "
        "recently used first, and a version that does not fit beside those held is refused; null: files go as soon "
        "as no process holds a version listing them",
    )
    version_idle_s: float = Field(
        120,
        gt=0,
        description="a replica drops a version no request has named for this long (never the one asked for last): "
        "how long the version before, its question model and its index stay held after the app moved on",
    )
    max_question_chars: int = Field(1000, gt=0, description="a longer question is refused with 413")
    max_k: int = Field(100, gt=0, description="the most passages a request may ask for (k); more is refused with 422")
    max_batch_questions: int = Field(64, gt=0, description="questions per /v1/search request")
    max_body_bytes: ByteSize = Field(256 * 1024, gt=0, description="a larger request body is refused with 413 unread")
    api_key_env: str | None = Field(None, description="environment variable holding the Bearer key (none = open)")
    batch_max_size: int = Field(32, gt=0, description="requests coalesced into one encode + search (1 = off)")
    reader_passages: int = Field(10, gt=0, description="top passages the reader reads")
    reader_max_length: int = Field(256, gt=0, description="tokens of question and passage the reader reads per passage")
    max_answer_tokens: int = Field(10, gt=0, description="the longest answer span the reader returns, in tokens")
    max_ongoing_requests: int = Field(32, gt=0, description="requests an ingress replica answers at once (Ray Serve's)")
    max_queued_requests: int = Field(64, gt=0, description="beyond this the proxy answers 503 at once")
    host: str = Field("127.0.0.1", description="where `jobs.demo` starts the app's HTTP proxy, and the nightly asks it")
    port: int = Field(
        8000, gt=0, description="the HTTP port with serve.host (a Serve config's http_options set its own)"
    )
    encoder_replicas: int = Field(1, gt=0, description="replicas of the question encoder (without autoscaling)")
    retriever_replicas: int = Field(1, gt=0, description="2+ so that a lost replica costs no request")
    shards: int = Field(
        1,
        gt=0,
        description="index shards: a Retriever deployment each (retriever_replicas replicas of retriever_cpus), "
        "holding the segments assigned to it (balanced by vectors); the ingress searches all and merges",
    )
    shard_resources: list[dict[str, float]] = Field(
        default_factory=list,
        description="custom Ray resources of each shard's replicas, one map per shard (e.g. [{shard0: 1}, {shard1: "
        "1}] with a worker group per shard started with those resources); empty = wherever they fit",
    )
    shard_timeout_s: float = Field(
        10, gt=0, description="an index shard that does not answer within this gets a 503 naming it"
    )
    mode: Literal["dense", "sparse", "hybrid"] = Field(
        "dense", description="retrieval when a request names none: DPR, BM25, or both fused (needs index.lexical)"
    )
    hybrid_depth: int = Field(100, gt=0, description="hybrid: candidates taken from each ranking before fusion")
    rrf_k: float = Field(60, gt=0, description="hybrid: reciprocal-rank fusion's constant (score w / (rrf_k + rank))")
    dense_weight: float = Field(0.5, ge=0, le=1, description="hybrid: the dense ranking's weight (BM25: 1 - it)")
    lexical_replicas: int = Field(1, gt=0, description="replicas of the BM25 deployment (with index.lexical)")
    lexical_cpus: float = Field(0.5, ge=0, description="CPUs per BM25 replica")
    refine_k: int | None = Field(
        None,
        ge=0,
        description="IVF-PQ candidates re-scored exactly per question (0 = off; null = the index's own "
        "index.refine_k); with shards, each shard re-scores its own candidates",
    )
    reader_replicas: int = Field(1, gt=0, description="replicas of the DPR reader (without autoscaling)")
    encoder_gpus: float = Field(0, ge=0, description="GPUs per question-encoder replica (1 on a GPU cluster)")
    encoder_cpus: float = Field(1, ge=0, description="CPUs per question-encoder replica (torch threads)")
    retriever_cpus: float = Field(1, ge=0, description="CPUs per retriever replica (FAISS search threads)")
    reader_gpus: float = Field(0, ge=0, description="GPUs per reader replica (1 on a GPU cluster)")
    reader_cpus: float = Field(1, ge=0, description="CPUs per reader replica")
    max_surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="replicas started beyond each part's count while a settings change replaces them (Ray Serve's "
        "max_surge_percent): with 100 every old replica answers until its replacement is ready, so a part with "
        "one replica never has none; it needs room for them (CPUs, and GPUs for GPU parts); 0 = Serve's own "
        "rolling update, which stops an old replica before starting its replacement",
    )
    autoscaling: dict[AUTOSCALED, Autoscaling] = Field(
        default_factory=dict,
        description="per part (ingress, encoder, retriever: every shard, lexical, reader), Ray Serve autoscaling "
        "instead of that part's fixed *_replicas",
    )

    @model_validator(mode="after")
    def _a_resource_map_per_shard(self) -> ServeConfig:
        if self.shard_resources and len(self.shard_resources) != self.shards:
            raise ValueError(
                f"shard_resources lists {len(self.shard_resources)} maps for {self.shards} shards: give one per shard"
            )
        return self


class NightlyConfig(Section):
    """The nightly run (`jobs.nightly`): where the Serve app it moves to the new version is, and when a full
    snapshot is written instead of a delta."""

    serve_address: str | None = Field(
        None,
        description="Ray dashboard URL whose Serve REST API gets the new "
        "index version, e.g. http://head:8265 (null = leave Serve)",
    )
    serve_app: str = Field("qa", description="the Serve application to update")
    serve_url: str | None = Field(
        None,
        description="where the app answers HTTP, to check it serves the new "
        "version (default: http://serve.host:serve.port)",
    )
    serve_timeout_s: float = Field(
        600, gt=0, description="how long the nightly waits for the app to answer from the new version"
    )
    full: bool = Field(False, description="write a full passage snapshot tonight instead of a delta")
    max_chain: int = Field(7, ge=0, description="delta snapshots in a row before a full one is written")


class RetainConfig(Section):
    """Retention (`jobs.gc`, and the nightly's last step): which index versions are kept with everything they need;
    the rest is deleted."""

    versions: int = Field(
        7, ge=1, description="the newest index versions kept, each with everything it lists and its snapshot chain"
    )
    min_age_h: float = Field(
        24,
        ge=0,
        description="no object younger than this is deleted, nor any version published within it (a night in "
        "flight writes its files before its manifest)",
    )
    pinned: list[str] = Field([], description="index versions kept whatever their age (a rollback target, say)")
    after_night: bool = Field(True, description="the nightly runs the retention step once it has published")


class EvaluateConfig(Section):
    """Top-k retrieval accuracy of a published version against exact search (`jobs.evaluate`): the questions, the
    output, the depth."""

    questions: str | None = Field(
        None, description="DPR .qa.csv (question<TAB>['answers']) or JSONL {question, answers}: path or URL"
    )
    output: str | None = Field(
        None, description="where the results JSON, report and plot go (default: <root>/evaluations/<index version>)"
    )
    k: list[int] = Field([1, 5, 20, 100], min_length=1, description="top-k accuracies to report")
    match: Literal["string", "regex"] = Field(
        "string", description="DPR's answer matching: token sequences, or regex (CuratedTREC)"
    )
    index_version: str | None = Field(None, description="index to evaluate (default: indexes/LATEST)")
    cache_dir: str = Field("/tmp/dpr-pipeline-index-cache", description="local copies of index versions")
    refine_k: int | None = Field(
        None, ge=0, description="candidates re-scored exactly for the refined row (null = the index's refine_k)"
    )
    nprobe: int | None = Field(None, gt=0, description="inverted lists probed (null = the index's nprobe)")

    @field_validator("k")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(k <= 0 for k in value):
            raise ValueError("every k must be positive")
        return value
