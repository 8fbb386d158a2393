"""What names an encoder and its vectors, without torch: a job's driver plans with these and leaves the model to
its actors, so it starts without importing torch or transformers."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

PACKAGE_PREFIX = "python-package:"


def resolve_model_path(model: str) -> str:
    """`python-package:NAME` names a model shipped inside a pip package (offline demo); anything else is
    passed to `from_pretrained` unchanged (a hub name or a path)."""
    if model.startswith(PACKAGE_PREFIX):
        return str(importlib.import_module(model[len(PACKAGE_PREFIX) :]).get_model_path())
    return model


@dataclass(frozen=True)
class EncoderSettings:
    """Everything that changes the vectors an encoder produces (and so names its output)."""

    model: str
    pooling: str = "dpr"
    max_length: int = 256
    normalize: bool = False
    dtype: str = "auto"
    question: bool = False  # DPR question encoder instead of the context encoder
    # Run the weights in the compute dtype (bf16 LayerNorms and residuals too) rather than autocast over fp32
    # weights: 1.45x the passages/s on an H200 at a min cosine of 0.9999 vs fp32 (benchmarks/gpu.py).
    cast_weights: bool = False
