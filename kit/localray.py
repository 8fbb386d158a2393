"""A throwaway `ray start` cluster for the tests and the benchmarks, and a stop that ends exactly its processes.

`ray stop` ends every Ray process on the machine (a developer's own cluster, another test session's) and a run
killed before it leaves a cluster that Ray's record (/tmp/ray/ray_current_cluster) still names. Here the cluster
lives in a temp dir of its own, so its record and logs stay there, and `stop` ends the processes that belong to it:
those whose command line names its temp dir or its GCS address, and their descendants.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from kit.jobs import free_port

HOST = "127.0.0.1"  # loopback only


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read."""
    found = {}
    for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
        info = process.info
        found[info["pid"]] = (info["ppid"] or 0, " ".join(info["cmdline"] or []))
    return found


def marked_processes(*marks: str) -> list[int]:
    """Processes whose command line holds one of `marks`, and all their descendants (Ray's workers, renamed
    `ray::IDLE`, name nothing), this process excepted."""
    table = _processes()
    ours = {pid for pid, (_, command) in table.items() if any(mark in command for mark in marks)}
    ours.discard(os.getpid())
    grew = True
    while grew:
        more = {pid for pid, (parent, _) in table.items() if parent in ours and pid not in ours}
        ours |= more
        grew = bool(more)
    return sorted(ours)


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if not _zombie(pid)]


class LocalRay:
    """`ray start --head` on 127.0.0.1 with its own temp dir; `stop` (also on exit from a `with`) ends it."""

    def __init__(
        self,
        temp_dir: Path,
        *,
        num_cpus: int | None = None,
        dashboard_port: int | None = None,
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.temp_dir = Path(temp_dir)
        self.env = env  # the environment its processes (and so its jobs' drivers) start with
        self.num_cpus = num_cpus
        self.resources = resources
        self.dashboard_port = dashboard_port
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"

    def start(self) -> str:
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        command = [
            ray_bin,
            "start",
            "--head",
            f"--node-ip-address={HOST}",
            f"--port={self.port}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            # each node's dashboard agent on a port of its own: the default (52365) is taken by whichever Ray on
            # this machine started first, and a cluster whose head agent cannot bind accepts no job submission
            f"--dashboard-agent-listen-port={free_port()}",
        ]
        if self.num_cpus is not None:
            command += [f"--num-cpus={self.num_cpus}", "--num-gpus=0"]
        if self.resources:
            command.append(f"--resources={json.dumps(self.resources)}")
        if self.dashboard_port is None:
            command.append("--include-dashboard=false")
        else:
            command += [
                "--include-dashboard=true",
                f"--dashboard-host={HOST}",
                f"--dashboard-port={self.dashboard_port}",
            ]
        self._run(command)
        return self.address

    def add_node(self, num_cpus: int, resources: dict[str, float]) -> None:
        """A second node on this machine (its own raylet and object store) joining the head: what `ray start
        --address` does on another host of a real cluster."""
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        self._run(
            [
                ray_bin,
                "start",
                f"--address={self.address}",
                f"--node-ip-address={HOST}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                f"--resources={json.dumps(resources)}",
                "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}",
            ]
        )

    def _run(self, command: list[str]) -> None:
        # loopback only; no token left in ~/.ray demanded
        env = {**(self.env or os.environ), "RAY_AUTH_MODE": "disabled"}
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=120, env=env)
        except subprocess.CalledProcessError as exc:
            self.stop()
            raise RuntimeError(f"{' '.join(command)} failed:\n{exc.stderr.decode()[-3000:]}") from None
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        """This cluster's processes: those naming its temp dir or GCS address (Ray's client server names it by the
        node's own IP: its GCS port is the mark), and all their descendants."""
        return marked_processes(str(self.temp_dir), self.address, f":{self.port} --")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM its processes, SIGKILL what is left after `grace_s`."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while pids and time.monotonic() < deadline:
                pids = alive(pids)
                time.sleep(0.1)
            if not pids:
                break

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def exit_on_signals() -> None:
    """SIGTERM and SIGINT end the process through SystemExit, so `finally` blocks and `with` exits run."""

    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
