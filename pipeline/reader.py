"""The DPR reader: answer spans from a question's top passages, without Ray (Serve wraps it; the GPU benchmark
times it as is).

Spans are chosen by `DPRReaderTokenizer.decode_best_spans` (relevance across passages first, then start/end
within). Inputs are padded to the longest passage of the batch, not to `max_length`, and the forward runs under
bf16 autocast on a GPU (fp32 on CPU), as the encoders do.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DPRReader, DPRReaderTokenizerFast

from pipeline.text_encoder import default_device, resolve_dtype, resolve_model_path


class SpanReader:
    """`read(requests)`: each request `{question, passages: [{title, text}], top_answers}` → its answer spans;
    all requests go through one forward pass."""

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
        self.model = DPRReader.from_pretrained(path).to(self.device).eval()
        self.max_length, self.max_answer_tokens = max_length, max_answer_tokens

    def read(self, requests: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        encoded = [
            self.tokenizer(
                questions=[r["question"]] * len(r["passages"]),
                titles=[p["title"] for p in r["passages"]],
                texts=[p["text"] for p in r["passages"]],
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            for r in requests
        ]
        longest = max(int(e["attention_mask"].sum(dim=1).max()) for e in encoded)
        encoded = [{key: e[key][:, :longest] for key in ("input_ids", "attention_mask")} for e in encoded]
        stacked = {key: torch.cat([e[key] for e in encoded]).to(self.device) for key in ("input_ids", "attention_mask")}
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32),
        ):
            output = self.model(**stacked)
        logits = {
            name: getattr(output, name).float().cpu() for name in ("start_logits", "end_logits", "relevance_logits")
        }
        answers, start = [], 0
        for request, inputs in zip(requests, encoded):
            end = start + len(request["passages"])
            sliced = type(output)(**{name: part[start:end] for name, part in logits.items()})
            spans = self.tokenizer.decode_best_spans(
                inputs, sliced, num_spans=request["top_answers"], max_answer_length=self.max_answer_tokens
            )
            answers.append(
                [
                    {
                        "text": s.text,
                        "score": float(s.span_score),
                        "relevance": float(s.relevance_score),
                        "passage": int(s.doc_id),
                        "start": int(s.start_index),
                        "end": int(s.end_index),
                    }
                    for s in spans
                ]
            )
            start = end
        return answers
