"""TP=8 x PP=2 on a simulated 2-node cluster whose raylets declare 8 (fake) GPUs each.

Workers compute on the CPU with gloo; placement is exactly what a GPU cluster
gets: one STRICT_PACK group of 8 GPU bundles per stage, one node per stage.
"""
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util import placement_group_table

from raypp.config import DeploymentConfig
from raypp.model.config import ModelConfig
from raypp.runtime.engine import Engine
from tests.reference import greedy, random_prompts, run_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_gpu_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "object_store_memory": 100 * 2**20})
    workers = [cluster.add_node(num_cpus=8, num_gpus=8, resources={"node_pool": 8},
                                object_store_memory=100 * 2**20) for _ in range(2)]
    ray.init(address=cluster.address)
    yield [w.node_id for w in workers]
    ray.shutdown()
    cluster.shutdown()


def test_tp8_pp2_across_two_nodes_matches_single_process(two_gpu_nodes, tiny_ckpt):
    prompts = random_prompts(ModelConfig.from_dir(tiny_ckpt).vocab_size, [3, 9, 5, 14, 7, 2, 11, 6], seed=5)
    base = {"model": {"path": str(tiny_ckpt)}, "scheduler": {"num_kv_blocks": 64}}
    single = Engine.from_config(DeploymentConfig.model_validate({**base, "parallel": {"device": "cpu"}}),
                                use_ray=False)
    expected = run_all(single, prompts, greedy(3))
    engine = Engine.from_config(DeploymentConfig.model_validate({**base, "parallel": {
        "tp": 8, "pp": 2, "device": "cpu", "placement_timeout_s": 120,
        "placement_resources": {"GPU": 1, "node_pool": 1}}}))
    try:
        nodes = [set(placement_group_table(pg)["bundles_to_node_id"].values()) for pg in engine.executor.groups]
        assert all(len(n) == 1 for n in nodes)                  # each stage packed on one node
        assert nodes[0] != nodes[1] and nodes[0] | nodes[1] == set(two_gpu_nodes)
        assert run_all(engine, prompts, greedy(3)) == expected
    finally:
        engine.shutdown()
    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())
