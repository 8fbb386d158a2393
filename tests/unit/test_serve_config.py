"""The QA app's settings travel in its Serve args (`python -m jobs.serve_config`), so an edited deployment YAML
changes what `serve deploy` sends and Serve rebuilds the app; the nightly's version change keeps them; no
credential is ever written there. Serve's own code-version hash says what it would rebuild; no Ray runs here."""

import inspect
import re

import pytest
import yaml
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.deployment import Application
from ray.serve.schema import ServeApplicationSchema

import pipeline.serve.app as app_module
from jobs import serve_config as writer
from kit.jobs import REPO, write_config
from pipeline.config import load_config
from pipeline.config.serve import APP_KEYS, app_settings, credentials_in, read_args, settings_config, with_settings
from pipeline.errors import ConfigError
from pipeline.ops.client import with_index_version
from tests.conftest import FAKE_CREDENTIALS

TEMPLATE = {
    "http_options": {"host": "127.0.0.1", "port": 8123},
    "applications": [
        {
            "name": "qa",
            "route_prefix": "/",
            "import_path": "pipeline.serve.app:app",
            "args": {"config": "placeholder.yaml"},
            "deployments": [{"name": "QAService", "num_replicas": 2, "user_config": {"index_version": "v1"}}],
        }
    ],
}
DEPLOYMENT = {
    "storage": {"root": "s3://bucket/dpr", "options": {"endpoint_url": "http://minio:9000"}},
    "ingest": {"input": "s3://bucket/in/psgs.tsv", "shard_rows": 500},
    "encode": {"model": "m-ctx"},
    "index": {"factory": "IVF4,Flat", "lexical": False},
    "serve": {"max_k": 20, "shards": 1, "reader_model": None, "max_body_bytes": "8KiB", "retriever_cpus": 2},
}


@pytest.fixture
def paths(tmp_path):
    config = write_config(tmp_path / "deploy.yaml", DEPLOYMENT)
    template = tmp_path / "serve.yaml"
    template.write_text(yaml.safe_dump(TEMPLATE))
    return config, template, tmp_path


def _write(config, template, out, *extra) -> tuple[int, dict]:
    code = writer.main(["--config", str(config), "--serve-config", str(template), "--output", str(out), *extra])
    return code, (yaml.safe_load(out.read_text()) if code == 0 else {})


def _qa(serve_config: dict) -> dict:
    [application] = [a for a in serve_config["applications"] if a["name"] == "qa"]
    return application


def _code_version(serve_config: dict) -> str:
    """What Serve compares on `serve deploy`: a new one rebuilds the app and replaces every replica."""
    return get_app_code_version(ServeApplicationSchema(**_qa(serve_config)))


def test_the_writer_puts_what_the_app_reads_in_the_args_and_keeps_the_rest(paths):
    config, template, tmp = paths
    code, written = _write(config, template, tmp / "out.yaml")
    assert code == 0
    assert (tmp / "out.yaml").read_text().startswith("# Written by `python -m jobs.serve_config --config")
    qa = _qa(written)
    assert qa["args"] == {
        "config": str(config),
        "settings": {
            "storage": {"root": "s3://bucket/dpr", "options": {"endpoint_url": "http://minio:9000"}},
            "index": {"lexical": False},
            "serve": {"max_k": 20, "shards": 1, "reader_model": None, "max_body_bytes": 8192, "retriever_cpus": 2.0},
        },
    }
    # everything else as the template has it: the version stays the QAService's user_config
    assert {k: v for k, v in qa.items() if k != "args"} == {
        k: v for k, v in TEMPLATE["applications"][0].items() if k != "args"
    }
    assert written["http_options"] == TEMPLATE["http_options"]
    # the app builds from them the config the file gives
    from_file, from_args = load_config(config), settings_config(qa["args"]["settings"])
    assert from_args.serve == from_file.serve and from_args.storage == from_file.storage
    assert from_args.index.lexical is from_file.index.lexical is False


def test_an_edited_setting_changes_the_args_and_serves_code_version(paths):
    config, template, tmp = paths
    _, before = _write(config, template, tmp / "a.yaml")
    _, again = _write(config, template, tmp / "b.yaml")
    assert _code_version(again) == _code_version(before)  # nothing edited: a redeploy restarts nothing
    for section, key, value in [("serve", "max_k", 50), ("serve", "shards", 2), ("storage", "root", "s3://b/other")]:
        edited = {**DEPLOYMENT, section: {**DEPLOYMENT[section], key: value}}
        write_config(config, edited)
        _, after = _write(config, template, tmp / "c.yaml")
        assert _qa(after)["args"]["settings"][section][key] == value
        assert _code_version(after) != _code_version(before), (section, key)
    # the problem this solves: args naming the file are the same string after any edit, so Serve rebuilds nothing
    by_path = {"applications": [{**TEMPLATE["applications"][0], "args": {"config": str(config)}}]}
    write_config(config, DEPLOYMENT)
    first = _code_version(by_path)
    write_config(config, {**DEPLOYMENT, "serve": {**DEPLOYMENT["serve"], "max_k": 50}})
    assert _code_version(by_path) == first


def test_what_the_app_does_not_read_leaves_the_args_alone(paths):
    config, template, tmp = paths
    _, before = _write(config, template, tmp / "a.yaml")
    write_config(config, {**DEPLOYMENT, "ingest": {"shard_rows": 9}, "index": {"factory": "Flat", "lexical": False}})
    _, after = _write(config, template, tmp / "b.yaml")
    assert _qa(after)["args"] == _qa(before)["args"]


def test_set_overrides_fold_into_the_settings(paths, tmp_path):
    config, _, tmp = paths
    sharded = {"applications": [{**TEMPLATE["applications"][0], "args": {"config": "x", "set": ["serve.shards=4"]}}]}
    template = tmp / "sharded.yaml"
    template.write_text(yaml.safe_dump(sharded))
    code, written = _write(config, template, tmp / "out.yaml", "--set", "serve.max_k=7")
    assert code == 0
    args = _qa(written)["args"]
    assert set(args) == {"config", "settings"}  # applied once, here
    assert (args["settings"]["serve"]["shards"], args["settings"]["serve"]["max_k"]) == (4, 7)


def test_the_documented_command_writes_configs_serve_yaml_with_the_production_settings(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert writer.main(["--config", "configs/wiki21m.yaml"]) == 0
    written = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    qa = _qa(written)
    assert qa["deployments"] == shipped["applications"][0]["deployments"]
    assert qa["args"]["config"] == "configs/wiki21m.yaml"
    production = load_config(REPO / "configs" / "wiki21m.yaml")
    assert settings_config(qa["args"]["settings"]).serve == production.serve


@pytest.mark.parametrize(
    "override, named",
    [
        (f"storage.options.key={FAKE_CREDENTIALS['AWS_ACCESS_KEY_ID']}", "'key' looks like a credential"),
        (
            f"storage.options.client_kwargs={{secret: {FAKE_CREDENTIALS['AWS_SECRET_ACCESS_KEY']}}}",
            "client_kwargs.secret",
        ),
        (
            f"storage.root=https://admin:{FAKE_CREDENTIALS['AWS_SECRET_ACCESS_KEY']}@store.internal/dpr",
            "storage.root has a password in its URL",
        ),
        (
            f"serve.reader_model=https://h/r.tar?X-Amz-Signature={FAKE_CREDENTIALS['AWS_SECRET_ACCESS_KEY']}",
            "serve.reader_model is a signed URL (X-Amz-Signature",
        ),
    ],
)
def test_credentials_are_refused_by_name_and_nothing_is_written(paths, capsys, override, named):
    config, template, tmp = paths
    out = tmp / "out.yaml"
    code = writer.main(["--config", str(config), "--serve-config", str(template), "-o", str(out), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and named in err and not out.exists()
    assert not any(secret in err for secret in FAKE_CREDENTIALS.values() if len(secret) > 10)


def test_credentials_are_found_wherever_they_sit():
    assert credentials_in({"a": {"b": [{"Token": "x"}]}, "u": "gs://bucket/x?sig=abc&v=1"}) == [
        "a.b[0].Token is a credential key",
        "u is a signed URL (sig in its query)",
    ]
    assert (
        credentials_in({"root": "s3://bucket/x", "e": "http://user@host:9000/", "n": None, "p": "http://h:bad/"}) == []
    )


def test_app_builds_from_either_form_and_both_give_the_same_config(paths, monkeypatch):
    config, template, tmp = paths
    built = []
    monkeypatch.setattr(app_module, "build_app", built.append)
    _, written = _write(config, template, tmp / "out.yaml")
    new_form = _qa(written)["args"]
    app_module.app({"config": str(config)})
    app_module.app(new_form)
    app_module.app({"settings": new_form["settings"]})  # a hand-written Serve config needs no file
    app_module.app({"config": "/nowhere/gone.yaml", "settings": new_form["settings"]})  # the file is not read
    app_module.app({**new_form, "set": ["serve.max_k=3"]})
    app_module.app({"config": str(config), "set": ["serve.max_k=3"]})
    old, new, bare, gone, new_set, old_set = built
    for other in (new, bare, gone):
        assert other.serve == old.serve and other.storage == old.storage and other.index.lexical is False
    assert new_set.serve.max_k == old_set.serve.max_k == 3 and new_set.serve == old_set.serve


@pytest.mark.parametrize(
    "args, message",
    [
        ({"config": "c.yaml", "setting": {}}, "unknown key(s) ['setting']"),
        ({}, "need settings"),
        ({"settings": "storage: {root: x}"}, "must be a mapping"),
        ({"settings": {"storage": {"root": "x"}}, "set": "serve.max_k=3"}, "list of dotted.key=value"),
        (
            {"settings": {"storage": {"root": "x"}, "serve": {"max_kk": 3}}, "config": "c.yaml"},
            "unknown key 'serve.max_kk'",
        ),
        ({"settings": {"storage": {"root": "x", "options": {"password": "p"}}}}, "storage.options.password is a"),
    ],
)
def test_app_refuses_bad_args_naming_what_is_wrong(args, message):
    with pytest.raises(ConfigError) as caught:
        app_module.app(args)
    assert message in str(caught.value)


def test_app_builds_the_real_graph_from_settings_without_ray(paths):
    config, _, _ = paths
    built = app_module.app({"settings": app_settings(load_config(config))})
    assert isinstance(built, Application)


def test_build_app_reads_only_what_the_settings_carry():
    """`APP_KEYS` must cover every key `build_app` reads of the deployment YAML, or an edit of it would not reach
    the app (and a missing section would silently be its default)."""
    source = inspect.getsource(app_module.build_app)
    read = set(re.findall(r"\bconfig\.(\w+)(?:\.(\w+))?", source))
    assert read, "build_app no longer reads `config.<section>`: update this check"
    for section, key in read:
        carried = APP_KEYS.get(section)
        assert carried is True or (key and key in carried), f"build_app reads config.{section}.{key}: add to APP_KEYS"


def test_the_nightly_keeps_the_settings_and_serve_applies_its_change_in_place(paths):
    """The nightly GETs the deployed config and PUTs it back with a new index_version: the args (and so Serve's
    code version) are unchanged, so the version moves through user_config, restarting nothing."""
    config, template, tmp = paths
    _, written = _write(config, template, tmp / "out.yaml")
    updated = with_index_version(written, "qa", "v2")
    assert _qa(updated)["args"] == _qa(written)["args"]
    assert _code_version(updated) == _code_version(written)
    [ingress] = [d for d in _qa(updated)["deployments"] if d["name"] == "QAService"]
    assert ingress["user_config"] == {"index_version": "v2"}
    assert read_args(_qa(updated)["args"])[0] == _qa(written)["args"]["settings"]


def test_the_writer_refuses_a_serve_config_without_the_app(paths):
    config, _, tmp = paths
    other = {"applications": [{"name": "x", "import_path": "other:app"}]}
    with pytest.raises(ConfigError, match="0 apps with import_path"):
        with_settings(other, config)
    with pytest.raises(ConfigError, match="no application named 'nope'"):
        with_settings(TEMPLATE, config, app="nope")
