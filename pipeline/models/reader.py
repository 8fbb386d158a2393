"""The DPR reader: answer spans from a question's top passages, without Ray (Serve wraps it; the benchmarks time it
as is).

The host work per question is kept off the critical path: a passage's token ids come with it from the index (the
build stored them, `pipeline.store.docstore`), so only the question is tokenized, and the batch's
`[CLS] question [SEP] title [SEP] text` rows are assembled from ids (`pipeline.models.spans.assemble`). Passages without
ids (a version built before, or another tokenizer's) are tokenized here. Spans are chosen for all passages at once
with tensor operations (`pipeline.models.spans.best_spans`), the spans `DPRReaderTokenizer.decode_best_spans` chooses.
Inputs are padded to the longest row of the batch, and the forward runs under bf16 autocast on a GPU (fp32 on
CPU), as the encoders do.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from transformers import DPRReader, DPRReaderTokenizerFast

from pipeline.models.spans import assemble, best_spans
from pipeline.models.text_encoder import default_device, resolve_dtype, resolve_model_path
from pipeline.models.tokens import fingerprint


class SpanReader:
    """`read(requests)`: each request `{question, passages: [{title, text, title_ids?, text_ids?}], top_answers,
    tokenizer?}` (`tokenizer`: the fingerprint of the tokenizer the passages' ids are from) → its answer spans; all
    requests go through one forward pass. `seconds` accumulates the time spent per phase (assemble, forward,
    spans)."""

    def __init__(
        self,
        model: str,
        max_length: int,
        max_answer_tokens: int,
        device: torch.device | str | None = None,
        dtype: str = "auto",
    ):
        path = resolve_model_path(model)
        self.device = torch.device(device) if device is not None else default_device()
        self.compute_dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = DPRReaderTokenizerFast.from_pretrained(path)
        self.fingerprint = fingerprint(self.tokenizer)
        self.model = DPRReader.from_pretrained(path).to(self.device).eval()
        self.max_length, self.max_answer_tokens = max_length, max_answer_tokens
        self.seconds: dict[str, float] = defaultdict(float)

    def _ids(self, request: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each passage's (title ids, text ids): the ones it came with when they are this reader's tokenizer's,
        else tokenized now."""
        passages = request["passages"]
        usable = request.get("tokenizer") == self.fingerprint
        titles: list = [p.get("title_ids") if usable else None for p in passages]
        texts: list = [p.get("text_ids") if usable else None for p in passages]
        missing = [i for i, ids in enumerate(texts) if ids is None]
        if missing:
            for column, field in ((titles, "title"), (texts, "text")):
                encoded = self.tokenizer([passages[i][field] for i in missing], add_special_tokens=False)
                for i, ids in zip(missing, encoded["input_ids"]):
                    column[i] = np.asarray(ids, dtype=np.int64)
        return titles, texts

    def _assemble(self, requests: list[dict[str, Any]]) -> list[np.ndarray]:
        questions = self.tokenizer([r["question"] for r in requests], add_special_tokens=False)["input_ids"]
        tok = self.tokenizer
        return [
            assemble(
                question,
                *self._ids(request),
                cls_id=tok.cls_token_id,
                sep_id=tok.sep_token_id,
                pad_id=tok.pad_token_id,
                max_length=self.max_length,
            )
            for question, request in zip(questions, requests)
        ]

    def read(self, requests: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        started = time.perf_counter()
        rows = self._assemble(requests)
        longest = max(r.shape[1] for r in rows)
        ids = np.full((sum(len(r) for r in rows), longest), self.tokenizer.pad_token_id, dtype=np.int64)
        at = 0
        for r in rows:
            ids[at : at + len(r), : r.shape[1]] = r
            at += len(r)
        input_ids = torch.from_numpy(ids)
        mask = input_ids != self.tokenizer.pad_token_id
        self.seconds["assemble"] += time.perf_counter() - started
        started = time.perf_counter()
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32),
        ):
            output = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
        start_logits, end_logits, relevance = (
            getattr(output, name).float().cpu() for name in ("start_logits", "end_logits", "relevance_logits")
        )
        self.seconds["forward"] += time.perf_counter() - started
        started = time.perf_counter()
        answers, at = [], 0
        for request, r in zip(requests, rows):
            part = slice(at, at + len(r))
            at += len(r)
            spans = best_spans(
                input_ids[part],
                start_logits[part],
                end_logits[part],
                relevance[part],
                sep_token_id=self.tokenizer.sep_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                num_spans=request["top_answers"],
                max_answer_length=self.max_answer_tokens,
            )
            answers.append(
                [
                    {
                        "text": self.tokenizer.decode(ids[part][s.passage, s.start : s.end + 1]),
                        "score": s.score,
                        "relevance": s.relevance,
                        "passage": s.passage,
                        "start": s.start,
                        "end": s.end,
                    }
                    for s in spans
                ]
            )
        self.seconds["spans"] += time.perf_counter() - started
        return answers
