"""deployments/70b_tp8_pp2.yaml on a simulated 2-node x 8-GPU cluster serves a chat completion.

The file runs as shipped except for what Serve's config lets a user override for this
cluster: the model path (the tiny checkpoint), `parallel.device: cpu` (the GPUs are fake),
`parallel.placement_resources` (bundles must land on the GPU nodes, not the head), and
`proxy_location: HeadOnly` (all simulated nodes share one IP, so only one proxy can bind
the port).  16 workers on 2 cores: slow (minutes), so decoding is kept to 3 tokens.
"""
import httpx
import openai
import pytest

from tests.serve_helpers import ServeRun, app_args, load_deployment

MB = 2**20


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "object_store_memory": 100 * MB, "include_dashboard": False})
    try:
        # 8 fake GPUs per node, and (as on a real GPU node) more CPUs than the 8 workers reserve, so
        # the ingress replica may land on a GPU node without starving a stage.
        for _ in range(2):
            c.add_node(num_cpus=10, num_gpus=8, resources={"node_pool": 8}, object_store_memory=100 * MB)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


@pytest.mark.slow
def test_70b_tp8_pp2_file_serves_a_chat_on_2x8_simulated_gpus(cluster, tiny_ckpt, tmp_path):
    config = load_deployment("70b_tp8_pp2.yaml")
    args = app_args(config)
    assert (args["parallel"]["tp"], args["parallel"]["pp"]) == (8, 2)
    args["model"]["path"] = str(tiny_ckpt)
    args["parallel"]["device"] = "cpu"
    args["parallel"]["placement_resources"] = {"node_pool": 1}
    args["parallel"]["placement_timeout_s"] = 180  # fail with the shortfall named before the test's timeout
    config["proxy_location"] = "HeadOnly"
    with ServeRun(config, tmp_path, address=cluster.address, ready_timeout_s=480) as s:
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", timeout=300, max_retries=0)
        name = args["model"]["served_name"]
        assert [m.id for m in client.models.list().data] == [name]
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=3, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop")
        assert 1 <= r.usage.completion_tokens <= 3 and r.usage.prompt_tokens > 3
        stats = httpx.get(s.base_url + "/stats", timeout=30).json()
        assert len(stats["stages"]) == 2 and all(st["steps"] > 0 for st in stats["stages"])
