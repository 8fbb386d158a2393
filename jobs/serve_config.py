"""Write the QA app's Serve config with its settings in it, for `serve deploy` (or a RayService's serveConfigV2):

    python -m jobs.serve_config --config configs/wiki21m.yaml > deploy.yaml
    serve deploy deploy.yaml --address http://<head>:8265

The Serve config `--serve-config` (default configs/serve.yaml) is written out with the QA app's args set to
`{config: <the deployment YAML>, settings: <what the app reads of it, with the --set overrides, validated>}`;
everything else in it (deployments, the QAService's user_config index_version, http_options) as it is. Edit the
deployment YAML, write again and `serve deploy` again: the settings changed, so the args did, and Serve rebuilds the
app (`pipeline.config.serve` says why a path alone is not enough). Needs no Ray; reads no storage.

Unlike the jobs beside it this prints YAML, not a JSON summary: stdout is the Serve config (or `--output FILE`).
Exit codes as theirs: 0 written, 2 a bad config or command line, or a credential that would be written (named).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pipeline.config.serve import with_settings
from pipeline.errors import ConfigError
from pipeline.runtime.cli import exit_process

DEFAULT_SERVE_CONFIG = "configs/serve.yaml"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.serve_config", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="deployment YAML (configs/*.yaml) whose settings the app runs with")
    p.add_argument(
        "--serve-config",
        default=DEFAULT_SERVE_CONFIG,
        help=f"the Serve config to write the settings into (default {DEFAULT_SERVE_CONFIG})",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="dotted.key=value",
        help="override one config key (value parsed as YAML), after the app's own args.set; repeatable",
    )
    p.add_argument("--app", help="the application to write (default: the one importing pipeline.serve.app:app)")
    p.add_argument("--output", "-o", help="write here instead of stdout")
    return p


def render(serve_config: dict, command: str) -> str:
    header = (
        f"# Written by `{command}`.\n"
        "# The QA app's args.settings are its deployment YAML's settings: edit that file, write this again and\n"
        '# `serve deploy` it (docs/serving.md, "Changing settings"). args.config only says where they came from.\n'
    )
    return header + yaml.safe_dump(serve_config, sort_keys=False, default_flow_style=False, width=120)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # argparse exits 2 on a bad command line
    try:
        try:
            template = yaml.safe_load(Path(args.serve_config).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read Serve config {args.serve_config}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"Serve config {args.serve_config} is not valid YAML: {exc}") from None
        written = with_settings(template, args.config, args.overrides, args.app)
    except ConfigError as exc:
        print(f"serve_config: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["python -m jobs.serve_config", *(argv if argv is not None else sys.argv[1:])])
    text = render(written, command)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    exit_process(main())
