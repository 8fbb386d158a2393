"""DPR / BERT-family passage and question encoders, fast and exact.

Speed comes from not computing padding: passages are tokenized without padding, sorted by length, and cut into
batches by a token budget, so each forward pass pads only to the longest passage of similar-length neighbours
(DPR pads everything to 256). On GPU the forward runs under bf16 (or fp16) autocast with SDPA attention; on CPU
in fp32. Results come back in input order, equal to calling the model one passage at a time.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder

from pipeline.errors import PipelineError
from pipeline.models.settings import EncoderSettings, resolve_model_path

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_batch_size: int) -> list[np.ndarray]:
    """Group sequence indices into batches whose padded size (rows x longest) fits the token budget.

    Longest first, so an out-of-memory shows on the first batch rather than after an hour. Pure: no I/O.
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        size = max(1, min(max_batch_size, batch_tokens // max(longest, 1)))
        batches.append(order[start : start + size])
        start += size
    return batches


def load_model(settings: EncoderSettings) -> torch.nn.Module:
    """The checkpoint's model, refusing silent surprises: a DPR checkpoint goes with `pooling: dpr` (and only
    then), and no weight may be missing (transformers would initialize it randomly and carry on)."""
    path = resolve_model_path(settings.model)
    is_dpr = AutoConfig.from_pretrained(path).model_type == "dpr"
    if is_dpr != (settings.pooling == "dpr"):
        raise PipelineError(
            f"model {settings.model} is {'a DPR' if is_dpr else 'not a DPR'} checkpoint: use pooling "
            f"{'dpr' if is_dpr else 'cls or mean'}, not {settings.pooling}"
        )
    model_class = (DPRQuestionEncoder if settings.question else DPRContextEncoder) if is_dpr else AutoModel
    model, info = model_class.from_pretrained(path, attn_implementation="sdpa", output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise PipelineError(
            f"model {settings.model} lacks {len(missing)} weights for {model_class.__name__} "
            f"(e.g. {missing[0]}): is it a {'question' if settings.question else 'context'} "
            "encoder checkpoint?"
        )
    return model


@dataclass
class Tokens:
    """Unpadded token ids of n sequences, flat with offsets: cheap to ship between Ray workers."""

    input_ids: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [n + 1]
    token_type_ids: np.ndarray | None = None  # int32 [total], when the model uses segment ids

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_lists(cls, input_ids: list[list[int]], token_type_ids: list[list[int]] | None = None) -> Tokens:
        offsets = np.zeros(len(input_ids) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids in input_ids], out=offsets[1:])
        flat = np.fromiter((t for ids in input_ids for t in ids), dtype=np.int32, count=int(offsets[-1]))
        types = None
        if token_type_ids is not None:
            types = np.fromiter((t for ids in token_type_ids for t in ids), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets, types)

    @classmethod
    def concat(cls, parts: Sequence[Tokens]) -> Tokens:
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.from_lists([])
        starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1], *(p.offsets[1:] + s for p, s in zip(parts, starts))])
        types = None
        if parts[0].token_type_ids is not None:
            types = np.concatenate([p.token_type_ids for p in parts])
        return cls(np.concatenate([p.input_ids for p in parts]), offsets, types)


CHUNK = 4096  # passages tokenized at once


class PassageTokenizer:
    """The CPU half of an encoder: DPR's `title [SEP] text` pairing, truncated, unpadded."""

    def __init__(self, settings: EncoderSettings):
        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.model))
        # DPR feeds zero segment ids for title+text pairs; generic BERT encoders use the tokenizer's.
        self.use_token_types = settings.pooling != "dpr" and "token_type_ids" in self.tokenizer.model_input_names
        self.pad_id = self.tokenizer.pad_token_id or 0

    def __call__(self, titles: Sequence[str] | None, texts: Sequence[str]) -> Tokens:
        """`CHUNK` passages at a time: the fast tokenizer's per-token objects for a whole 100k-row shard took
        ~5 GB of a worker's memory (`benchmarks/scale.py`), its ids as flat int32 arrays take ~70 MB."""
        return Tokens.concat(
            [
                self._encode(None if titles is None else titles[start : start + CHUNK], texts[start : start + CHUNK])
                for start in range(0, len(texts), CHUNK)
            ]
        )

    def _encode(self, titles: Sequence[str] | None, texts: Sequence[str]) -> Tokens:
        args = (list(texts),) if titles is None else (list(titles), list(texts))
        encoded = self.tokenizer(
            *args,
            truncation=True,
            max_length=self.settings.max_length,
            return_attention_mask=False,
            return_token_type_ids=self.use_token_types,
        )
        return Tokens.from_lists(encoded["input_ids"], encoded["token_type_ids"] if self.use_token_types else None)

    def digest(self) -> bytes:
        tokenizer = self.tokenizer
        if tokenizer.is_fast:
            return tokenizer.backend_tokenizer.to_str().encode()
        return repr(sorted(tokenizer.get_vocab().items())).encode()


class TextEncoder:
    """A loaded encoder; `encode(titles, texts)` → float32 [n, dim] in input order."""

    def __init__(
        self,
        settings: EncoderSettings,
        device: torch.device | str | None = None,
        batch_tokens: int | None = None,
        max_batch_size: int = 512,
        compile: bool = False,
    ):
        self.settings = settings
        self.device = torch.device(device) if device is not None else default_device()
        self.compute_dtype = resolve_dtype(settings.dtype, self.device)
        # Big batches feed a GPU; on CPU, small ones stay in cache (measured: 4096 beats 16384 by 1.4x).
        self.batch_tokens = batch_tokens or (65536 if self.device.type == "cuda" else 4096)
        self.max_batch_size = max_batch_size
        self.tokenize = PassageTokenizer(settings)
        self.model = load_model(settings).to(self.device).eval()
        self.cast_weights = settings.cast_weights and self.compute_dtype != torch.float32
        if self.cast_weights:
            self.model.to(self.compute_dtype)
        # One graph for every (batch, length): dynamic shapes, so length-sorted batches do not recompile.
        self.forward = torch.compile(self.model, dynamic=True) if compile else self.model
        config = self.model.config
        self.dim = int(getattr(config, "projection_dim", 0) or config.hidden_size)

    def fingerprint(self) -> str:
        """`<model-name>-<hash>`: hash of weights, tokenizer, pooling, max_length, normalize and compute dtype."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(self.tokenize.digest())
        s = self.settings
        digest.update(f"{s.pooling}|{s.max_length}|{s.normalize}|{self.compute_dtype}|{s.question}".encode())
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", s.model.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1])
        return f"{name[:48]}-{digest.hexdigest()[:16]}"

    def encode(self, titles: Sequence[str] | None, texts: Sequence[str]) -> np.ndarray:
        return self.encode_tokens(self.tokenize(titles, texts))

    @torch.inference_mode()
    def encode_tokens(self, tokens: Tokens) -> np.ndarray:
        """Vectors stay on the device until the last batch: the host never waits for the GPU between batches,
        so it pads the next batch while the current one runs."""
        lengths = tokens.lengths
        out = torch.empty((len(tokens), self.dim), dtype=torch.float32, device=self.device)
        for batch in plan_batches(lengths, self.batch_tokens, self.max_batch_size):
            out[self._to_device(batch)] = self._forward(batch, tokens, lengths)
        return out.cpu().numpy()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _forward(self, batch: np.ndarray, tokens: Tokens, lengths: np.ndarray) -> torch.Tensor:
        batch_lengths = lengths[batch]
        longest = int(batch_lengths.max())
        columns = np.arange(longest)
        real = columns[None, :] < batch_lengths[:, None]
        # Gather every row's tokens at once; positions past a row's end read its last token and are masked.
        positions = tokens.offsets[batch][:, None] + np.minimum(
            columns[None, :], np.maximum(batch_lengths[:, None] - 1, 0)
        )
        ids = np.where(real, tokens.input_ids[positions], self.tokenize.pad_id).astype(np.int64)
        inputs = {"input_ids": ids, "attention_mask": real.astype(np.int64)}
        if tokens.token_type_ids is not None:
            inputs["token_type_ids"] = np.where(real, tokens.token_type_ids[positions], 0).astype(np.int64)
        inputs = {key: self._to_device(value) for key, value in inputs.items()}
        autocast = self.compute_dtype != torch.float32 and not self.cast_weights
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=autocast):
            output = self.forward(**inputs)
        embeddings = self._pool(output, inputs["attention_mask"]).float()
        if self.settings.normalize:
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        return embeddings

    def _pool(self, output, mask: torch.Tensor) -> torch.Tensor:
        if self.settings.pooling == "dpr":
            return output.pooler_output
        hidden = output.last_hidden_state
        if self.settings.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def question_settings(manifest, fallback_model: str, pooling: str | None = None) -> EncoderSettings:
    """The question encoder that pairs with an index version: the model its manifest records
    (`encode.question_model` at build time; `fallback_model`, i.e. `serve.question_model`, for versions that record
    none), with the pooling, normalization and length its passages were encoded with (`pooling` overrides)."""
    encoder = dict(manifest.encoder)
    pooling = pooling or encoder.get("pooling", "dpr")
    return EncoderSettings(
        model=encoder.get("question_model") or fallback_model,
        pooling=pooling,
        max_length=int(encoder.get("max_length", 256)),
        normalize=bool(encoder.get("normalize", False)),
        dtype="auto",
        question=pooling == "dpr",
    )
