"""`python -m benchmarks.gpu --quick`: the GPU benchmark's code, run on CPU with tiny models so it cannot rot
between the rare runs on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kit.jobs import REPO


def test_quick_run_prints_every_figure(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--quick", "--commit", "abc123"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, run.stdout
    result = json.loads(lines[0])
    assert json.loads((tmp_path / "gpu.json").read_text()) == result
    assert not [key for key in result if key.endswith("_error")]
    assert result["quick"] is True and result["commit"] == "abc123"
    assert result["passages"] == 1000 and 120 <= result["tokens_median"] <= 160 and result["tokens_p95"] <= 256
    assert set(result["encoder"]) == {
        f"{mode}_{tokens}"
        for mode in ("autocast", "bf16_weights", "bf16_weights_compiled", "bf16_weights_packed")
        for tokens in (2048, 4096, 8192)
    }
    assert result["encoder_best"] in result["encoder"]
    for figures in result["encoder"].values():
        assert figures["passages_per_s"] > 0 and figures["tflops"] > 0 and figures["peak_fraction"] > 0
    for key in (
        "matmul_tflops",
        "encoder_passages_per_s",
        "dpr_loop_fp32_passages_per_s",
        "dpr_loop_fp16_passages_per_s",
        "speedup_vs_dpr_fp32",
        "speedup_vs_dpr_fp16",
        "tokenizer_passages_per_s",
        "tokenizer_tokens_mean",
        "tokenizer_cores_per_gpu",
        "question_p50_ms",
        "question_batch64_per_s",
        "reader_batch1_questions_per_s",
        "reader_batch8_questions_per_s",
    ):
        assert result[key] > 0, key
    for phase in ("assemble", "forward", "spans", "host"):  # the reader's split, before and after token ids
        assert result["reader_ms_before"][phase] > 0 and result["reader_ms_after"][phase] > 0, phase
    assert result["reader_ms_after"]["host"] < result["reader_ms_before"]["host"]
    # bf16 against fp32 on the same weights: close, but not bit-identical (the bf16 path really ran).
    assert 0.9 < result["bf16_min_cosine_centered_autocast"] < 1.0
    assert result["bf16_min_cosine_autocast"] >= result["bf16_min_cosine_centered_autocast"] - 1e-6
    # Weights cast to bf16 lose most of what tells tiny random-model passages apart: measured, not asserted.
    assert -1.0 <= result["bf16_min_cosine_centered_bf16_weights"] <= 1.0
    # The compiled graph computes the same vectors as the eager bf16-weights model, within bf16 rounding.
    assert result["bf16_min_cosine_bf16_weights_compiled"] > 0.999
    assert result["first_call_seconds"]["bf16_weights_compiled"] > 0
    # Packed without padding (on CPU, attention a passage at a time): the eager bf16-weights vectors, within rounding.
    assert result["bf16_min_cosine_bf16_weights_packed"] > 0.999
    for mode in ("autocast", "bf16_weights", "bf16_weights_compiled", "bf16_weights_packed"):
        assert 0 <= result[f"top10_overlap_{mode}"] <= 1, mode
