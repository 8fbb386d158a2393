"""The encoder's batching and token plumbing without a model."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.models.text_encoder import Tokens, plan_batches


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


@given(
    st.lists(st.lists(st.integers(0, 30000), max_size=6), min_size=1, max_size=12),
    st.lists(st.integers(1, 12), min_size=1, max_size=5),
    st.booleans(),
)
def test_tokens_concatenated_from_chunks_equal_the_tokens_of_all_at_once(sequences, cuts, with_types):
    """A shard is tokenized in chunks (`PassageTokenizer`, 4,096 passages each) and joined: the same ids, offsets
    and segment ids as one call over every passage."""
    types = [[i % 2 for i in range(len(s))] for s in sequences] if with_types else None
    bounds = sorted({0, len(sequences), *(min(c, len(sequences)) for c in cuts)})
    parts = [
        Tokens.from_lists(sequences[a:b], types[a:b] if types is not None else None) for a, b in zip(bounds, bounds[1:])
    ]
    whole, joined = Tokens.from_lists(sequences, types), Tokens.concat(parts)
    assert joined.input_ids.tolist() == whole.input_ids.tolist() and joined.offsets.tolist() == whole.offsets.tolist()
    assert (joined.token_type_ids is None) == (types is None)
    if types is not None:
        assert joined.token_type_ids.tolist() == whole.token_type_ids.tolist()
