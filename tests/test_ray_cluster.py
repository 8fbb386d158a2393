"""Which Ray the jobs and benchmarks use, and what they leave behind: a dead cluster recorded by `ray start` is
refused at once with what to do; a benchmark stopped by SIGTERM ends its Ray and leaves no record."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kit.corpora import synthetic_rows, write_tsv
from kit.jobs import REPO, free_port, run_job, write_config
from kit.localray import _processes, alive, marked_processes

pytestmark = pytest.mark.reliability


def _two_file_ingest(tmp_path):
    """Ingest of two files: the job fans them out as Ray tasks, so it must connect to a Ray."""
    (tmp_path / "in").mkdir()
    write_tsv(tmp_path / "in" / "a.tsv", synthetic_rows(20, words=10))
    write_tsv(tmp_path / "in" / "b.tsv", synthetic_rows(20, start=100, words=10))
    return write_config(
        tmp_path / "c.yaml",
        {"storage": {"root": str(tmp_path / "store")}, "ingest": {"input": str(tmp_path / "in"), "snapshot": "s1"}},
    )


@pytest.fixture
def short_tmp():
    """A temp dir with a short path: Ray's sockets under it must fit AF_UNIX's 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_dead_recorded_cluster_fails_at_once_and_says_what_to_do(tmp_path, short_tmp):
    config = _two_file_ingest(tmp_path)
    record = short_tmp / "ray" / "ray_current_cluster"  # where ray.init() looks when RAY_TMPDIR is short_tmp
    record.parent.mkdir()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    record.write_text(dead)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(short_tmp)
    started = time.monotonic()
    run = run_job("ingest", config, env=env, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    assert time.monotonic() - started < 30  # Ray alone retries for minutes
    error = run.summary["error"]
    assert f"no Ray answers at {dead}" in error and str(record) in error
    assert "ray stop" in error and "RAY_ADDRESS" in error
    assert not (tmp_path / "store" / "passages" / "s1" / "_manifest.json").exists()

    env["RAY_ADDRESS"] = "local"  # an explicit private Ray is used whatever the record says
    run = run_job("ingest", config, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.summary["rows"] == 40 and record.read_text() == dead


def _ours(marker: str) -> list[tuple[int, str]]:
    return [(pid, command) for pid, (_, command) in _processes().items() if marker in command and pid != os.getpid()]


def test_a_benchmark_stopped_by_sigterm_leaves_no_ray_behind(short_tmp):
    """`python -m benchmarks.nightly` starts its own cluster (`ray start`); SIGTERM mid-run ends it, its job and its
    work dir, and the machine's record of the current cluster is as it was."""
    tmp_path = short_tmp
    machine_record = tmp_path / "machine-tmp" / "ray" / "ray_current_cluster"
    env = {**os.environ, "TMPDIR": str(tmp_path), "RAY_TMPDIR": str(tmp_path / "machine-tmp")}
    env.pop("RAY_ADDRESS")
    bench = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.nightly", "--passages", "3000"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and bench.poll() is None:
            commands = [command for _, command in _ours(str(tmp_path))]
            if any("gcs_server" in c for c in commands) and any("jobs.nightly" in c for c in commands):
                break
            time.sleep(0.5)
        assert bench.poll() is None, bench.stderr.read()[-2000:]
        time.sleep(2)  # the nightly job is connected and working
        cluster = marked_processes(str(tmp_path))  # GCS, raylet, workers, the job, the benchmark itself
        assert len(cluster) >= 5
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=90)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 128 + signal.SIGTERM
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive(cluster):
        time.sleep(0.5)
    assert alive(cluster) == []  # no raylet, GCS, worker or job left
    assert sorted(tmp_path.iterdir()) == []  # its work dir and its cluster's temp dir (logs, record) removed
    assert not machine_record.exists()
