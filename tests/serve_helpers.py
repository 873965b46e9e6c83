"""`serve run` as a test subprocess: start it on a free port, wait for /health, stop it cleanly.

Measured here (docs in ../shared/RAY_ON_THIS_MACHINE.md): a `serve run` started in a new
session stops cleanly on SIGINT (its KeyboardInterrupt handler shuts Serve down and
the Ray it started); SIGTERM would leave the applications running.  The process group
is killed as a last resort so that a hung test never leaves Ray behind on a shared box.
"""
from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
SERVE_BIN = Path(sys.executable).parent / "serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_deployment(name: str) -> dict:
    return yaml.safe_load((REPO / "deployments" / name).read_text())


def app_args(config: dict) -> dict:
    return config["applications"][0]["args"]


def _default_sigint():
    # A shell's background job inherits SIGINT as ignored, and Python then never installs its
    # KeyboardInterrupt handler: `serve run` would not stop on SIGINT.  Reset it in the child.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServeRun:
    def __init__(self, config: dict, workdir: Path, *, address: str = "local", env: dict | None = None,
                 ready_timeout_s: float = 300):
        self.config = copy.deepcopy(config)
        self.port = free_port()
        self.config.setdefault("http_options", {})["port"] = self.port
        self.config["http_options"]["host"] = "127.0.0.1"
        self.workdir = Path(workdir)
        self.address = address
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "serve_run.log"
        self.proc: subprocess.Popen | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> "ServeRun":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "deployment.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(SERVE_BIN), "run", "--address", self.address, str(cfg_path)],
                                     cwd=self.workdir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_default_sigint)
        return self

    def wait_ready(self, path: str = "/health") -> "ServeRun":
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + path, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"serve run not ready after {self.ready_timeout_s}s:\n{self.log_tail()}")

    def wait_for_log(self, needle: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return True
            if self.proc.poll() is not None:
                return needle in self.log_text()
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the CLI leads its own process group
        if self.proc.poll() is None:
            os.killpg(pgid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(pgid, signal.SIGKILL)
                    self.proc.wait(timeout=15)
        # Whatever the CLI started and left in its group (raylet, gcs, workers) goes too.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        self.proc = None

    def __enter__(self):
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    # ---- logs ----------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])
