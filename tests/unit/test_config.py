import re
from pathlib import Path

import pytest

from kit.jobs import REPO, run_job, write_config
from pipeline.config import apply_override, load_config
from pipeline.errors import ConfigError


@pytest.mark.parametrize("name", ["demo.yaml", "wiki21m.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(REPO / "configs" / name)
    assert config.storage.root
    assert config.ingest.input


def test_production_config_names_facebook_models():
    config = load_config(REPO / "configs" / "wiki21m.yaml")
    assert config.storage.root.startswith("s3://")
    assert config.ingest.input.endswith("psgs_w100.tsv.gz")
    assert config.encode.model == "facebook/dpr-ctx_encoder-single-nq-base"
    assert config.encode.question_model == "facebook/dpr-question_encoder-single-nq-base"
    assert config.serve.reader_model == "facebook/dpr-reader-single-nq-base"


def test_overrides_are_yaml_scalars_and_create_nested_keys(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"storage": {"root": "/tmp/x"}})
    config = load_config(
        path,
        [
            "ingest.shard_rows=250",
            "storage.options.endpoint_url=http://127.0.0.1:9000",
            "serve.reader_model=null",
            "ingest.snapshot=2026-01-02",
        ],
    )
    assert config.ingest.shard_rows == 250
    assert config.storage.options == {"endpoint_url": "http://127.0.0.1:9000"}
    assert config.serve.reader_model is None
    assert config.ingest.snapshot == "2026-01-02"


def test_later_override_wins():
    data = {"storage": {"root": "/a"}}
    apply_override(data, "storage.root=/b")
    apply_override(data, "storage.root=/c")
    assert data["storage"]["root"] == "/c"


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({"storage": {"root": "/x"}, "ingest": {"shard_row": 5}}, [], "unknown key 'ingest.shard_row'"),
        ({"storage": {"root": "/x"}, "extra": {}}, [], "unknown key 'extra'"),
        ({"storage": {"root": "/x"}}, ["encode.pooling=max"], "'encode.pooling'"),
        ({"storage": {"root": "/x"}}, ["ingest.shard_rows=0"], "'ingest.shard_rows'"),
        ({"storage": {"root": "/x"}}, ["ingest.snapshot=../escape"], "'ingest.snapshot'"),
        ({"ingest": {}}, [], "missing key 'storage'"),
        ({"storage": {"root": "/x"}}, ["storage.root.deeper=1"], "'storage.root' is not a section"),
        ({"storage": {"root": "/x"}}, ["novalue"], "dotted.key=value"),
        ({"storage": {"root": "/x"}}, ["index.refine_k=40", "index.keep_vectors=false"], "set keep_vectors true"),
        ({"storage": {"root": "/x"}}, ["serve.shards=3", "serve.shard_resources=[{a: 1}]"], "1 maps for 3 shards"),
    ],
)
def test_config_errors_name_the_key(tmp_path, data, overrides, message):
    path = write_config(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(path, overrides)


@pytest.mark.parametrize("key", ["key", "secret", "aws_secret_access_key", "client_kwargs.aws_session_token"])
def test_credentials_in_storage_options_are_refused(tmp_path, key):
    path = write_config(tmp_path / "c.yaml", {"storage": {"root": "s3://b/p"}})
    with pytest.raises(ConfigError, match="credential"):
        load_config(path, [f"storage.options.{key}=abc"])


def test_unknown_key_on_the_command_line_exits_2(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"storage": {"root": str(tmp_path / "store")}})
    run = run_job("ingest", path, "ingest.bogus=1")
    assert run.returncode == 2
    assert "unknown key 'ingest.bogus'" in run.stderr
    assert run.summary["status"] == "error"


def test_missing_config_file_exits_2(tmp_path):
    run = run_job("ingest", tmp_path / "nope.yaml")
    assert run.returncode == 2
    assert "nope.yaml" in run.stderr


def test_bad_command_line_exits_2():
    run = run_job("ingest", Path("configs/demo.yaml"), "no-equals-sign")
    assert run.returncode == 2


def test_autoscaling_is_checked_and_becomes_ray_serves_autoscaling_config():
    from pipeline.serve.app import replicas

    scaled = load_config(
        REPO / "configs" / "demo.yaml", ["serve.autoscaling={encoder: {max_replicas: 3, target_ongoing_requests: 0.5}}"]
    ).serve
    assert replicas(scaled, "encoder", 1)["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 0.5,
        "upscale_delay_s": 30,
        "downscale_delay_s": 600,
        "metrics_interval_s": 10,
        "look_back_period_s": 30,
    }
    assert replicas(scaled, "reader", 4) == {"num_replicas": 4, "max_surge_percent": 100}  # no autoscaling: its count
    for bad, says in (
        ("{encoder: {min_replicas: 3, max_replicas: 2}}", "min_replicas (3) <= initial_replicas (3) <= max_replicas"),
        ("{decoder: {max_replicas: 2}}", "decoder"),
        ("{encoder: {max_replicas: 2, target: 1}}", "target"),
    ):
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(REPO / "configs" / "demo.yaml", [f"serve.autoscaling={bad}"])
