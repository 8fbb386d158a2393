"""The encoder's batching and token plumbing without a model."""

import numpy as np

from pipeline.text_encoder import Tokens, plan_batches


def test_plan_batches_covers_every_index_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 257, size=1000)
    batches = plan_batches(lengths, batch_tokens=2048, max_batch_size=64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert all(len(b) * lengths[b].max() <= 2048 and len(b) <= 64 for b in batches)
    assert lengths[batches[0]].max() == lengths.max()  # longest first: out of memory shows at once
    assert plan_batches([300], batch_tokens=100, max_batch_size=8)[0].tolist() == [0]  # never an empty batch


def test_tokens_from_lists_roundtrip():
    tokens = Tokens.from_lists([[1, 2, 3], [4], []], [[0, 0, 1], [0], []])
    assert tokens.lengths.tolist() == [3, 1, 0] and len(tokens) == 3
    assert tokens.input_ids[tokens.offsets[0] : tokens.offsets[1]].tolist() == [1, 2, 3]
    assert tokens.token_type_ids.tolist() == [0, 0, 1, 0]
