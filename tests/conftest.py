"""Shared fixtures: raypp's own deterministic checkpoints, made once per test session."""
import os

import pytest

# Ray must not phone home, and every component stays on loopback (see docs/architecture.md).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from raypp.model.tiny import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    from raypp.model.tiny import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", preset="small", seed=0)


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray cluster for one test module (never a cluster already running here)."""
    import ray
    ray.init(address="local", num_cpus=8, object_store_memory=100 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    yield
    ray.shutdown()
