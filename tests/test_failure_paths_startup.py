"""Startups that cannot finish, through `serve run`: a checkpoint the workers cannot read, and a
later stage that cannot be placed after the earlier ones were.  Each fails the deploy once,
naming the cause, and leaves no stage worker and no placement group behind."""
import shutil
import time

import httpx
import pytest

from tests.failure_paths_helpers import live_groups, ray_head, stage_pids, tiny_pp2, wait_for
from tests.serve_helpers import ServeRun

pytestmark = pytest.mark.slow

PLACEMENT_TIMEOUT_S = 5


def failed_deploy(config, workdir, head, needle: str, timeout_s: float = 240) -> float:
    """Starts `serve run`, waits for `needle` in its log; returns the seconds it took."""
    server = ServeRun(config, workdir, address=head.address)
    t0 = time.monotonic()
    server.start()
    try:
        assert server.wait_for_log(needle, timeout_s), server.log_tail(80)
        took = time.monotonic() - t0
        # Serve does not retry the constructor, and the replica gave back what it had reserved.
        wait_for(lambda: not live_groups() and not stage_pids(), 60, "no raypp placement group or worker left")
        assert httpx.get(server.base_url + "/health", timeout=10).status_code != 200
        return took
    finally:
        server.stop()


def test_worker_setup_failure_and_late_placement_timeout_leave_nothing_behind(tiny_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    for f in broken.glob("*.safetensors"):   # config and tokenizer read fine; the weights do not
        f.write_bytes(b"\x00" * 64)
    with ray_head(tmp_path, num_cpus=2) as head:
        # The error names the worker, the checkpoint and the cause.
        took = failed_deploy(tiny_pp2(broken), tmp_path / "setup", head,
                             f"failed to start from {broken}: SafetensorError")
        print(f"measured: unreadable checkpoint -> deploy failed {took:.1f}s after serve run started")
        # 2 CPUs: the replica (0.5) and stage 0 (1) fit, stage 1 (1 more) does not.
        late = tiny_pp2(tiny_ckpt, cpus_per_worker=1, placement_timeout_s=PLACEMENT_TIMEOUT_S)
        took = failed_deploy(late, tmp_path / "placement", head,
                             f"placement timed out after {PLACEMENT_TIMEOUT_S}s at stage 1")
        print(f"measured: stage 1 unplaceable -> deploy failed {took:.1f}s after serve run started "
              f"(placement_timeout_s={PLACEMENT_TIMEOUT_S})")
        log = (tmp_path / "placement" / "serve_run.log").read_text()
        assert "cannot place 2 stage(s) of 1 workers" in log
        assert log.count("PlacementError: placement timed out") == 1
