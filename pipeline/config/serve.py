"""The QA app's settings inside its Serve config, so that `serve deploy` sees an edit (pure; no Ray).

Ray Serve rebuilds an application on `serve deploy` only when its `import_path`, `runtime_env` or `args` change
(they hash into the app's code version; a new one replaces every replica, rolling); a changed `user_config`,
`num_replicas` or `autoscaling_config` is applied to the running replicas. An app whose args only name its
deployment YAML (`args.config: configs/wiki21m.yaml`) never sees that file change, and on a remote cluster the
file is read from the cluster's working directory, not the operator's. So the Serve config carries the settings
themselves: `args.settings` holds what the app reads of the deployment YAML (`APP_KEYS`: storage, serve,
index.lexical) as the YAML and its `--set`s give them, validated by the same typed config. Any edit changes the
args and Serve rebuilds the app; an edit to what the app does not read (ingest, encode, the index build) leaves
them alone and restarts nothing. The version the app serves stays in the QAService's `user_config`, applied in
place, where the nightly sets it; the nightly puts back the args it finds.

Nothing secret may go there: Serve keeps the config in its controller and shows it on the dashboard and its REST
API. `storage.options` credentials are refused by the typed config as everywhere; a URL with a password or a
signed URL's query (`X-Amz-Signature`, a SAS `sig`, ...) in any carried value is refused here.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pipeline.config import CREDENTIAL_KEYS, PipelineConfig, config_from, load_config
from pipeline.errors import ConfigError

IMPORT_PATH = "pipeline.serve.app:app"
# What `build_app` reads of the deployment YAML (tests/unit/test_serve_config.py checks its source against this).
APP_KEYS: dict[str, Any] = {"storage": True, "serve": True, "index": {"lexical"}}
ARGS = frozenset({"config", "settings", "set"})
# Query parameters that make a URL a credential: S3 and GCS presigned URLs, Azure SAS, bearer tokens.
SIGNED_QUERY = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "signature",
        "sig",
        "token",
        "access_token",
        "awsaccesskeyid",
    }
)


def app_settings(config: PipelineConfig) -> dict[str, Any]:
    """What the app reads of `config` (`APP_KEYS`), as the YAML and its overrides set it: defaults stay out, as
    they are out of the YAML, so the settings change exactly when one of those keys is edited."""
    settings = config.model_dump(mode="json", exclude_unset=True, include=APP_KEYS)
    return {section: value for section, value in settings.items() if value or section == "storage"}


def settings_sha256(settings: dict[str, Any]) -> str:
    """A short name for a set of settings (logged by the app; equal settings, equal hash)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def credentials_in(value: Any, where: str = "") -> list[str]:
    """Every place in `value` (nested dicts and lists) that holds a credential, each saying why: a credential key
    (`CREDENTIAL_KEYS`), a URL with a password, a URL signed in its query."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            dotted = f"{where}.{key}" if where else str(key)
            if str(key).lower() in CREDENTIAL_KEYS:
                found.append(f"{dotted} is a credential key")
            else:
                found += credentials_in(item, dotted)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += credentials_in(item, f"{where}[{i}]")
    elif isinstance(value, str) and "://" in value:
        try:
            url = urlsplit(value)
            password = url.password
        except ValueError:  # not a URL after all (a bad port, say)
            return found
        if password:
            found.append(f"{where} has a password in its URL")
        signed = sorted({name for name, _ in parse_qsl(url.query) if name.lower() in SIGNED_QUERY})
        if signed:
            found.append(f"{where} is a signed URL ({', '.join(signed)} in its query)")
    return found


def refuse_credentials(settings: dict[str, Any]) -> None:
    """ConfigError naming every credential in settings bound for a Serve config."""
    found = credentials_in(settings)
    if found:
        raise ConfigError(
            "refusing to put credentials in the Serve config, which Serve stores and shows on its dashboard and REST "
            f"API: {'; '.join(found)}. Credentials come from the environment (AWS_ACCESS_KEY_ID, ...) or the "
            "instance role, the API key from serve.api_key_env"
        )


def read_args(args: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """The QA app's Serve args checked: (`settings`, or None when only `config` names a deployment YAML; the `set`
    overrides). ConfigError for anything else, naming it, and for credentials in the settings."""
    if not isinstance(args, dict):
        raise ConfigError(f"the QA app's args must be a mapping, not {type(args).__name__}")
    unknown = set(args) - ARGS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in the QA app's args: it takes {sorted(ARGS)}")
    overrides = args.get("set") or []
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise ConfigError("args.set must be a list of dotted.key=value strings")
    settings = args.get("settings")
    if settings is None:
        if not args.get("config"):
            raise ConfigError("the QA app's args need settings (python -m jobs.serve_config writes them) or config")
        return None, list(overrides)
    if not isinstance(settings, dict):
        raise ConfigError(f"args.settings must be a mapping of config sections, not {type(settings).__name__}")
    refuse_credentials(settings)
    return settings, list(overrides)


def settings_config(
    settings: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str | None = None
) -> PipelineConfig:
    """The typed config from `args.settings` and `set` overrides, validated as a deployment YAML is (`source`: the
    file they were written from, for the message)."""
    return config_from(copy.deepcopy(settings), overrides, f"args.settings{f' (from {source})' if source else ''}")


def with_settings(
    serve_config: dict[str, Any],
    config_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    app: str | None = None,
) -> dict[str, Any]:
    """`serve_config` (a Serve config: configs/serve.yaml's shape) with the QA app's args replaced by
    `{config: config_path, settings: ...}`: the deployment YAML at `config_path` loaded with the app's own `set`
    overrides and then `overrides`, validated, and cut to what the app reads. Everything else (deployments, the
    QAService's user_config, http_options) is kept as it is. `app` names the application (default: the one whose
    import_path is the QA app's). Not mutated."""
    if not isinstance(serve_config, dict) or not isinstance(serve_config.get("applications"), list):
        raise ConfigError("the Serve config has no applications list")
    applications = [dict(application) for application in serve_config["applications"]]
    if app is None:
        chosen = [a for a in applications if a.get("import_path") == IMPORT_PATH]
        if len(chosen) != 1:
            names = [a.get("name") for a in chosen]
            raise ConfigError(
                f"the Serve config has {len(chosen)} apps with import_path {IMPORT_PATH} {names}: name it, --app"
            )
    else:
        chosen = [a for a in applications if a.get("name") == app]
        if not chosen:
            raise ConfigError(f"the Serve config has no application named {app!r}")
    [target] = chosen
    old = target.get("args") or {}
    unknown = set(old) - ARGS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in application {target.get('name')!r}'s args")
    config = load_config(config_path, [*(old.get("set") or []), *overrides])
    settings = app_settings(config)
    refuse_credentials(settings)
    target["args"] = {"config": str(config_path), "settings": settings}
    return {**serve_config, "applications": applications}
