"""The packed encoder (`pipeline.models.packed`) gives the padded encoder's vectors: tiny DPR context and question
encoders (with and without DPR's projection) and a mean-pooled BERT, loaded through `from_pretrained`, on sequences of
any length from 1 token up, in fp32 on CPU, where attention runs a passage at a time through SDPA."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kit.models import tiny_dpr
from pipeline.models.packed import PackedTextEncoder
from pipeline.models.text_encoder import EncoderSettings, TextEncoder, Tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("packed")
    plain = tiny_dpr(root, ("ctx", "question"), layers=2)
    projected = tiny_dpr(root, ("ctx",), layers=2, projection_dim=24, name="projected")
    return {"ctx": plain["ctx"], "question": plain["question"], "projected": projected["ctx"]}


def pair(model: str, **options) -> tuple[TextEncoder, PackedTextEncoder]:
    made = EncoderSettings(model=model, dtype="float32", **options)
    return TextEncoder(made, device="cpu", batch_tokens=96), PackedTextEncoder(made, device="cpu", batch_tokens=96)


def close(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding summed in another order, which the tiny models' initializer_range 1.0 amplifies
    layer by layer: within 1e-4 of the largest component (a 43-token passage, no padding at all, differs by 1.2e-5;
    a token attending across passages or a wrong position moves components by ~1)."""
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), np.abs(got - expected).max()


@pytest.fixture(scope="module")
def ctx_pair(models) -> tuple[TextEncoder, PackedTextEncoder]:
    return pair(models["ctx"])


def random_tokens(lengths: list[int], seed: int, types: bool) -> Tokens:
    rng = np.random.default_rng(seed)
    ids = [[101, *rng.integers(1996, 30000, max(0, n - 1)).tolist()][:n] for n in lengths]
    segment = [[int(i >= n // 2) for i in range(n)] for n in lengths] if types else None
    return Tokens.from_lists(ids, segment)


@pytest.mark.parametrize(
    "kind, options",
    [("ctx", {}), ("projected", {}), ("question", {"question": True})],
)
def test_packed_vectors_are_the_padded_ones(models, kind, options):
    padded, packed = pair(models[kind], **options)
    tokens = random_tokens([1, 2, 5, 40, 17, 3, 64, 9, 1, 33], seed=0, types=True)
    expected = padded.encode_tokens(tokens)
    assert expected.shape == (10, padded.dim)
    close(packed.encode_tokens(tokens), expected)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 48), min_size=1, max_size=24), seed=st.integers(0, 2**16))
def test_any_lengths_pack_to_the_same_vectors(ctx_pair, lengths, seed):
    padded, packed = ctx_pair
    tokens = random_tokens(lengths, seed, types=False)
    close(packed.encode_tokens(tokens), padded.encode_tokens(tokens))
