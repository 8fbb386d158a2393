"""One typed configuration per deployment, loaded from YAML plus `--set dotted.key=value` overrides.

Every job reads the sections it needs (`pipeline.config.sections`) from the same file, so a deployment is described
once. Unknown keys are errors, each named.

The configuration package: this loading, the sections' models (`sections.py`), the Serve config's settings
(`serve.py`) and the reference pages written from them (`reference.py`). Imports `pipeline.errors` and
`pipeline.primitives` only, beside its own modules.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from pipeline.config.sections import (
    CREDENTIAL_KEYS,
    Autoscaling,
    EncodeConfig,
    EvaluateConfig,
    IndexConfig,
    IngestConfig,
    NightlyConfig,
    RetainConfig,
    Section,
    ServeConfig,
    StorageConfig,
)
from pipeline.errors import ConfigError

__all__ = [
    "CREDENTIAL_KEYS",
    "Autoscaling",
    "EncodeConfig",
    "EvaluateConfig",
    "IndexConfig",
    "IngestConfig",
    "NightlyConfig",
    "PipelineConfig",
    "RetainConfig",
    "ServeConfig",
    "StorageConfig",
    "apply_override",
    "argument_parser",
    "config_from",
    "load_config",
]


class PipelineConfig(Section):
    storage: StorageConfig
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)
    retain: RetainConfig = Field(default_factory=RetainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as a YAML scalar."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[: depth + 1])}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        elif item["type"] == "missing":
            lines.append(f"missing key '{key}'")
        else:
            lines.append(f"'{key}': {item['msg']}")
    return "; ".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read the YAML file (if any), apply overrides in order, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections")
        data = loaded or {}
    return config_from(data, overrides, f"config{f' {path}' if path else ''}")


def config_from(data: dict[str, Any], overrides: list[str] | tuple[str, ...], what: str) -> PipelineConfig:
    """`data` (a deployment YAML's mapping, changed in place) with the overrides applied in order, validated;
    errors name `what` it came from and each bad key."""
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {what}: {_describe(exc)}") from None


def argument_parser(job: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{job}", description=f"Run the {job} job.")
    parser.add_argument("--config", required=True, help="deployment YAML (configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="dotted.key=value",
        help="override one config key (value parsed as YAML); repeatable",
    )
    return parser
