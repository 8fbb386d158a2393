"""Running the jobs as a user runs them (`python -m jobs.<name> --config ... --set ...`), from tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass
class JobRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict[str, Any]:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert lines, f"no summary line; stderr:\n{self.stderr[-3000:]}"
        return json.loads(lines[-1])


def run_job(
    job: str,
    config: Path | str,
    *overrides: str,
    timeout: float | None = 600,
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
) -> JobRun:
    """`python -m jobs.<job> --config ... [flags] --set ...` in the repository, as a user runs it (in this process's
    environment unless `env` is given)."""
    command = [sys.executable, "-m", f"jobs.{job}", "--config", str(config), *flags]
    for item in overrides:
        command += ["--set", item]
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy() if env is None else env,
    )
    return JobRun(done.returncode, done.stdout, done.stderr)


def run_chain(config: Path | str, jobs: tuple[str, ...] = ("ingest", "encode", "build_index")) -> dict[str, JobRun]:
    """Each job in turn on `config`, as a user runs them; AssertionError naming the first that fails."""
    runs = {}
    for job in jobs:
        runs[job] = run_job(job, config)
        assert runs[job].returncode == 0, f"{job}: {runs[job].stderr[-3000:]}"
    return runs


def run_ok(job: str, config: Path | str, *overrides: str) -> tuple[dict[str, Any], float]:
    """`run_job` for a benchmark, unbounded: (its summary, wall seconds); SystemExit with its stderr's tail when it
    fails."""
    started = time.perf_counter()
    run = run_job(job, config, *overrides, timeout=None)
    if run.returncode != 0:
        raise SystemExit(f"{job} failed:\n{run.stderr[-3000:]}")
    return run.summary, time.perf_counter() - started


def kill_when_logged(job: str, config: Path | str, text: str, *overrides: str) -> int:
    """Run `python -m jobs.<job>` and SIGKILL its whole process group as soon as its stderr logs `text` (a phase
    starting, say); returns its exit status (-9 when killed, else what it exited with)."""
    command = [sys.executable, "-m", f"jobs.{job}", "--config", str(config)]
    for item in overrides:
        command += ["--set", item]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    for line in process.stderr:
        if text in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    return process.wait(timeout=120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
