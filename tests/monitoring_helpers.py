"""A Ray head with a known metrics port, and Debian's `prometheus` scraping it, for tests.

Both run in their own process group on free loopback ports and a private temp dir, so
they never meet another Ray or Prometheus on the machine, and `stop()` ends exactly
what `start()` began (SIGTERM, then SIGKILL of the group).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.serve_helpers import free_port

RAY_BIN = Path(sys.executable).parent / "ray"


def _stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    if proc.poll() is None:
        proc.terminate()  # the leader first: `ray start --block` shuts its own processes down in order
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # Whatever the leader started and left in its group goes too.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(timeout=15)


class RayHead:
    """`ray start --head --block` whose metrics agent exports on `metrics_port`."""

    def __init__(self, workdir: Path, num_cpus: int = 4, report_interval_ms: int = 1000):
        self.workdir = workdir
        self.port, self.metrics_port = free_port(), free_port()
        # Ray wants short socket paths: a private dir under /tmp, not pytest's deep tmp_path.
        self.temp_dir = Path(f"/tmp/raypp-{self.port}")
        self.num_cpus = num_cpus
        # Workers push metrics to the agent on this period (Ray's default: 10 s).
        # A loopback-only test cluster: no token authentication (on by default for `ray start`).
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "RAY_AUTH_MODE": "disabled",
                    "RAY_metrics_report_interval_ms": str(report_interval_ms)}
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "RayHead":
        cmd = [str(RAY_BIN), "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard=false",
               f"--port={self.port}", f"--metrics-export-port={self.metrics_port}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--num-cpus={self.num_cpus}", "--object-store-memory=200000000", f"--temp-dir={self.temp_dir}"]
        self._log = open(self.workdir / "ray_head.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.workdir / 'ray_head.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=3).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError("the Ray head's metrics agent did not answer in 120 s")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, timeout_s=30)
            self._log.close()
            self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Prometheus:
    """Debian's prometheus on a loopback port, scraping `targets` every second."""

    def __init__(self, workdir: Path, targets: list[str]):
        self.workdir, self.targets = workdir, targets
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Prometheus":
        binary = shutil.which("prometheus")
        assert binary, "Debian's prometheus is not installed (.ci/run installs it: apt-get install prometheus)"
        cfg = self.workdir / "prometheus.yml"
        targets = ", ".join(f"'{t}'" for t in self.targets)
        cfg.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                       f"scrape_configs:\n  - job_name: ray\n    static_configs: [{{targets: [{targets}]}}]\n")
        self._log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=3).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("prometheus not ready in 60 s")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, timeout_s=20)
            self._log.close()
            self.proc = None

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr, **({"time": at} if at is not None else {})}
        r = httpx.get(self.url + "/api/v1/query", params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query_range",
                      params={"query": expr, "start": start, "end": end, "step": step}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        r = httpx.get(f"{self.url}/api/v1/label/{label}/values", params={"match[]": match}, timeout=30)
        return r.json()["data"]
