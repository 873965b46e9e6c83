"""Losing a whole node of a simulated fake-GPU cluster: the pipeline is rebuilt on the nodes
left when they have room (streams resume identically), and fails in bounded time, naming
the shortfall, when they have not."""
import asyncio
import time

import psutil
import pytest
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from raypp.config import DeploymentConfig
from raypp.model.config import ModelConfig
from raypp.runtime.engine import Engine, EngineDeadError
from tests.reference import random_prompts
from tests.test_rebuild import run_with_fault, tokens

pytestmark = pytest.mark.slow


def config(ckpt, placement_timeout_s):
    return DeploymentConfig.model_validate({
        "model": {"path": str(ckpt)}, "scheduler": {"num_kv_blocks": 128},
        "parallel": {"tp": 2, "pp": 2, "device": "cpu", "cpus_per_worker": 0.5, "max_rebuilds": 1,
                     "placement_timeout_s": placement_timeout_s,
                     "placement_resources": {"GPU": 1, "node_pool": 1}}})


@pytest.fixture
def gpu_nodes(request):
    """A head without GPUs and `request.param` nodes of 2 fake GPUs each."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "object_store_memory": 100 * 2**20})
    nodes = [cluster.add_node(num_cpus=2, num_gpus=2, resources={"node_pool": 2},
                              object_store_memory=100 * 2**20) for _ in range(request.param)]
    ray.init(address=cluster.address)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_ckpt):
    return random_prompts(ModelConfig.from_dir(tiny_ckpt).vocab_size, [5, 17, 9, 30], seed=4)


def node_of_stage(engine, cluster_nodes, stage):
    node_id = ray.util.placement_group_table(engine.executor.groups[stage])["bundles_to_node_id"][0]
    return next(n for n in cluster_nodes if n.node_id == node_id)


def lose_node(cluster, node):
    """A lost node takes its processes with it.  Removing a simulated node kills only its Ray
    daemons; the workers they started run on until they notice their raylet is gone (a second
    or more), which a fast pipeline of a tiny model can outlast, finishing every request
    without ever seeing the loss.  So the node's workers die with it here, as on real hardware."""
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    workers = raylet.children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for proc in workers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.parametrize("gpu_nodes", [3], indirect=True)
def test_a_lost_node_is_replaced_by_a_spare_and_streams_resume(gpu_nodes, tiny_ckpt, prompts):
    cluster, nodes = gpu_nodes
    single = Engine.from_config(DeploymentConfig.model_validate(
        {"model": {"path": str(tiny_ckpt)}, "parallel": {"device": "cpu"}}), use_ray=False)
    try:
        expected = run_with_fault(single, prompts, None)
    finally:
        single.shutdown()
    engine = Engine.from_config(config(tiny_ckpt, 120))
    try:
        lost = node_of_stage(engine, nodes, 1)
        got = run_with_fault(engine, prompts, lambda e: lose_node(cluster, lost))
        assert tokens(got) == tokens(expected)
        assert engine.rebuilds == 1
        used = {ray.util.placement_group_table(g)["bundles_to_node_id"][0] for g in engine.executor.groups}
        assert lost.node_id not in used and len(used) == 2
    finally:
        engine.shutdown()


@pytest.mark.parametrize("gpu_nodes", [2], indirect=True)
def test_with_no_room_left_the_engine_fails_in_bounded_time_naming_the_shortfall(gpu_nodes, tiny_ckpt, prompts):
    cluster, nodes = gpu_nodes
    engine = Engine.from_config(config(tiny_ckpt, 5))
    try:
        lost = node_of_stage(engine, nodes, 0)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="cannot place 2 stage"):
            run_with_fault(engine, prompts, lambda e: lose_node(cluster, lost))
        assert time.monotonic() - start < 120
        with pytest.raises(EngineDeadError):
            asyncio.run(engine.check_health())
    finally:
        engine.shutdown()
