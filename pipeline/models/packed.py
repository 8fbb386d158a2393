"""A BERT-family context encoder over packed passages: a batch's tokens are concatenated without padding and each
passage attends only to itself, through FlashAttention's variable-length kernel on CUDA
(`torch.nn.attention.varlen.varlen_attn`) or, elsewhere, SDPA a passage at a time (the same arithmetic, for the
parity tests on CPU). Every linear layer then runs on real tokens only, and one batch is one set of kernel shapes
per layer whatever its passages' lengths.

A variant `benchmarks/gpu.py` measures against the padded path (`TextEncoder`); the encode job keeps the padded
path until the GPU figures say which is faster.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.text_encoder import TextEncoder, Tokens


def dpr_encoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The DPREncoder inside a DPR context or question encoder; None for another model."""
    return next((getattr(model, n) for n in ("ctx_encoder", "question_encoder") if hasattr(model, n)), None)


def bert_of(model: torch.nn.Module) -> torch.nn.Module:
    """The BertModel inside a DPR encoder (or the model itself)."""
    encoder = dpr_encoder(model)
    if encoder is not None:
        return encoder.bert_model
    if hasattr(model, "embeddings") and hasattr(model, "encoder"):
        return model
    raise ValueError(f"{type(model).__name__}: packed encoding needs a BERT-family model")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int) -> torch.Tensor:
    """Attention of each packed sequence over itself: [tokens, heads, head_dim] in and out."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu, cu, longest, longest)
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        part = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [heads, length, head_dim]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(*part).transpose(0, 1)
    return out


def packed_hidden(
    bert: torch.nn.Module,
    ids: torch.Tensor,
    types: torch.Tensor,
    positions: torch.Tensor,
    cu: torch.Tensor,
    longest: int,
) -> torch.Tensor:
    """BERT's last hidden states of packed sequences ([tokens, hidden]), layer by layer as BertModel computes them
    in eval mode (post-LayerNorm residuals, GELU), with attention confined to each sequence."""
    embeddings = bert.embeddings
    hidden = embeddings.LayerNorm(
        embeddings.word_embeddings(ids)
        + embeddings.position_embeddings(positions)
        + embeddings.token_type_embeddings(types)
    )
    heads = bert.config.num_attention_heads
    for layer in bert.encoder.layer:
        attention = layer.attention
        q, k, v = (
            projection(hidden).view(len(ids), heads, -1)
            for projection in (attention.self.query, attention.self.key, attention.self.value)
        )
        mixed = varlen_attention(q, k, v, cu, longest).reshape(len(ids), -1)
        attended = attention.output.LayerNorm(attention.output.dense(mixed) + hidden)
        inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(attended))
        hidden = layer.output.LayerNorm(layer.output.dense(inner) + attended)
    return hidden


class PackedTextEncoder(TextEncoder):
    """`TextEncoder` with each batch packed (same batches, same pooling, same vectors up to rounding)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bert = bert_of(self.model)
        if self.settings.pooling not in ("dpr", "cls", "mean"):
            raise ValueError(f"pooling {self.settings.pooling!r}: packed encoding pools dpr, cls or mean")
        # DPR's projection of [CLS], when projection_dim > 0
        self.projection = (
            getattr(dpr_encoder(self.model), "encode_proj", None) if self.settings.pooling == "dpr" else None
        )

    def _forward(self, batch: np.ndarray, tokens: Tokens, lengths: np.ndarray) -> torch.Tensor:
        batch_lengths = lengths[batch]
        cu = np.zeros(len(batch) + 1, dtype=np.int32)
        np.cumsum(batch_lengths, out=cu[1:])
        # each packed token's place in `tokens`, and its position within its own passage
        within = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], batch_lengths)
        source = np.repeat(tokens.offsets[batch], batch_lengths) + within
        types = tokens.token_type_ids[source] if tokens.token_type_ids is not None else np.zeros_like(source)
        ids, types, positions, cu_t = (
            self._to_device(np.ascontiguousarray(a))
            for a in (tokens.input_ids[source].astype(np.int64), types.astype(np.int64), within, cu)
        )
        autocast = self.compute_dtype != torch.float32 and not self.cast_weights
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=autocast):
            hidden = packed_hidden(self.bert, ids, types, positions, cu_t, int(batch_lengths.max()))
            embeddings = self._pool_packed(hidden, cu_t, batch_lengths)
        embeddings = embeddings.float()
        if self.settings.normalize:
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        return embeddings

    def _pool_packed(self, hidden: torch.Tensor, cu: torch.Tensor, batch_lengths: np.ndarray) -> torch.Tensor:
        if self.settings.pooling == "mean":
            rows = torch.repeat_interleave(
                torch.arange(len(batch_lengths), device=hidden.device), self._to_device(batch_lengths.astype(np.int64))
            )
            sums = torch.zeros((len(batch_lengths), hidden.shape[1]), dtype=torch.float32, device=hidden.device)
            sums.index_add_(0, rows, hidden.float())
            return sums / self._to_device(batch_lengths.astype(np.float32))[:, None].clamp(min=1e-9)
        first = hidden[cu[:-1].long()]  # each passage's [CLS]
        return self.projection(first) if self.projection is not None else first
