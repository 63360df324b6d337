"""A Ray head of a test's own, started the way a cluster node starts one (`ray start --head`), with
a dashboard serving the jobs API, for tests that drive it with the `ray job submit` CLI.

It has its own temp dir, ports and auth token, so it never meets the session's `ray.init` cluster
or anyone else's; it is stopped through its own process session, never with `ray stop` (which stops
every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_classifier_args(data: str, storage: str, name: str, *options: str) -> list[str]:
    """`deeprec` arguments for a classifier run of one epoch of two steps on one worker."""
    return ["train", "classifier", "--data", data, "--storage", storage, "--name", name, *options] + (
        "--epochs 1 --steps-per-epoch 2 --num-workers 1 --set data.loader_workers=0".split()
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    dashboard: str  # http://127.0.0.1:PORT: the jobs API, what `ray job submit --address` takes
    env: dict[str, str]  # the head's environment; its token is what the `ray` CLI authenticates with
    process: subprocess.Popen
    temp_dir: str
    gcs_address: str = ""  # 127.0.0.1:PORT: what `ray start --address` of a joining node takes
    nodes: list[subprocess.Popen] = field(default_factory=list)  # worker nodes that joined

    @classmethod
    def start(cls, env: dict[str, str], num_cpus: int, timeout_s: float = 120) -> RayHead:
        """`ray start --head --block` in a new process session; returns once the jobs API answers."""
        # Short on purpose: Ray's unix sockets live under it, and their paths must fit in 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
        # Not the test session's cluster: neither its address nor its state API (conftest.ray_cluster).
        env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        # `python` in an entrypoint must be this interpreter, as it is the image's on a cluster.
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(16),
            PATH=f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}",
        )
        # On SIGTERM a node drains for up to 30 s before stopping: a test's head has nothing to hand over.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        dashboard_port, gcs_port = _free_port(), _free_port()
        args = [
            RAY,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--port={gcs_port}",
            f"--ray-client-server-port={_free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--object-store-memory=300000000",
        ]
        with open(os.path.join(temp_dir, "ray-start.log"), "w") as log:
            process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        head = cls(f"http://127.0.0.1:{dashboard_port}", env, process, temp_dir, gcs_address=f"127.0.0.1:{gcs_port}")
        head._wait_until_ready(timeout_s)
        return head

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                self._get("/api/jobs/")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        log = open(os.path.join(self.temp_dir, "ray-start.log")).read()[-3000:]
        self.stop()
        raise RuntimeError(f"the test's Ray head did not start within {timeout_s} s:\n{log}")

    def _get(self, path: str) -> object:
        request = urllib.request.Request(
            self.dashboard + path, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def jobs_cli(self, command: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        """`ray job COMMAND --address DASHBOARD ARGS...` from the repository root."""
        argv = [RAY, "job", command, "--address", self.dashboard, *args]
        return subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout_s)

    def submit(
        self, entrypoint: list[str], submission_id: str, runtime_env: dict | None = None, timeout_s: float = 540
    ) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .`, waiting for the job to end."""
        env_args = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
        return self.jobs_cli(
            "submit",
            "--submission-id",
            submission_id,
            "--working-dir",
            ".",
            *env_args,
            "--",
            *entrypoint,
            timeout_s=timeout_s,
        )

    def job(self, submission_id: str) -> dict:
        """The jobs API's record of a job: status, message, driver_info, ..."""
        return self._get(f"/api/jobs/{submission_id}")  # type: ignore[return-value]

    def join_node(self, num_cpus: int) -> None:
        """A worker node joins the cluster (`ray start --address HEAD --block`), as a node the
        autoscaler booted would."""
        args = [
            RAY,
            "start",
            "--block",
            f"--address={self.gcs_address}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--object-store-memory=200000000",
        ]
        with open(os.path.join(self.temp_dir, f"node-{len(self.nodes)}.log"), "w") as log:
            self.nodes.append(
                subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def stop(self) -> None:
        """The joined nodes, then the head: SIGTERM lets `ray start --block` drain and stop what it
        started; whatever is left of each one's process session (workers included) is killed by pid."""
        for process in [*self.nodes, self.process]:
            _stop_session(process)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _stop_session(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for pid in _session_members(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.poll() is None:
        process.wait(timeout=10)


def _session_members(session: int) -> list[int]:
    """Processes whose session id is `session` (/proc/PID/stat: state ppid pgrp session ...)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            members.append(int(entry))
    return members
