"""Which steps the workers replay as CUDA graphs, and the knob that bounds them: pure rules,
checked without a GPU (tests/test_gpu.py runs the graphs themselves)."""
import pytest
from pydantic import ValidationError

from raypp.config import ParallelSection
from raypp.model.graph_batches import CUDA_GRAPH_MAX_BATCH, bucket, graph_batch


def test_buckets_are_powers_of_two_up_to_the_cap():
    assert [bucket(n, 64) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64)] == [1, 2, 4, 4, 8, 8, 16, 64, 64]
    assert [bucket(n, 48) for n in (17, 32, 33, 48)] == [32, 32, 48, 48]  # a cap that is no power of two


def test_only_sampled_pure_decode_steps_that_fit_replay():
    def rule(query_lens, seq_lens=None, all_logits=False, max_batch=16, max_len=256):
        return graph_batch(query_lens, seq_lens or [100] * len(query_lens), all_logits, max_batch, max_len)

    assert rule([1]) == 1 and rule([1] * 3) == 4 and rule([1] * 16) == 16
    assert rule([1] * 17) is None                      # more sequences than the largest graph
    assert rule([1, 5, 1]) is None                     # a prefill chunk in the batch
    assert rule([7]) is None
    assert rule([1, 1], all_logits=True) is None       # every token's logits asked for
    assert rule([1, 1], seq_lens=[256, 257]) is None   # a context past the graphs' block tables
    assert rule([1, 1], seq_lens=[256, 3]) == 2
    assert rule([1], max_batch=0) is None              # graphs off
    assert rule([]) is None


def test_knob_default_and_validation():
    assert ParallelSection().cuda_graph_max_batch == CUDA_GRAPH_MAX_BATCH == 64
    assert ParallelSection(cuda_graph_max_batch=0).cuda_graph_max_batch == 0
    with pytest.raises(ValidationError, match="cuda_graph_max_batch must be 0 .CUDA graphs off. or the largest"):
        ParallelSection(cuda_graph_max_batch=-1)


def test_cpu_worker_builds_no_graphs(tiny_ckpt):
    from raypp.model.config import ModelConfig
    from raypp.parallel.layout import make_layout
    from raypp.runtime.worker import StageWorker

    layout = make_layout(ModelConfig.from_dir(tiny_ckpt), 1, 1)
    worker = StageWorker(str(tiny_ckpt), "float32", layout, 0, 0, num_blocks=4, block_size=16, cuda_graph_max_batch=64)
    assert worker.graphs is None
    off = StageWorker(str(tiny_ckpt), "float32", layout, 0, 0, num_blocks=4, block_size=16, cuda_graph_max_batch=0)
    assert worker.kv_cache_bytes == off.kv_cache_bytes  # no scratch block either


def test_graph_inputs_stage_every_index_of_a_step_in_one_buffer():
    """raypp/model/graph_inputs.py: a step's token ids, positions, slots, lengths and block
    tables land in the device views the graph reads; padding rows are one-token contexts in
    the scratch block and keep their earlier ids; a stage without ids has no ids row."""
    import torch

    from raypp.model.graph_inputs import GraphInputs

    inputs = GraphInputs(batch=4, max_blocks=5, block_size=16, scratch_block=99, token_ids=True,
                         device=torch.device("cpu"))
    assert inputs.tables.tolist() == [[99] * 5] * 4 and inputs.lens.tolist() == [1] * 4
    inputs.stage([7, 8, 9], [3, 17, 40], [[4], [5, 6], [1, 2, 3]])
    assert inputs.ids.tolist() == [7, 8, 9, 0]
    assert inputs.positions.tolist() == [2, 16, 39, 0]
    assert inputs.slots.tolist() == [4 * 16 + 2, 6 * 16 + 0, 3 * 16 + 7, 99 * 16]
    assert inputs.lens.tolist() == [3, 17, 40, 1]
    assert inputs.tables[:, :3].tolist() == [[4, 99, 99], [5, 6, 99], [1, 2, 3], [99, 99, 99]]
    assert inputs.lens.dtype == inputs.tables.dtype == torch.int32 and inputs.slots.dtype == torch.int64
    inputs.stage([11], [4], [[4]])
    assert inputs.ids.tolist() == [11, 8, 9, 0] and inputs.positions.tolist() == [3, 0, 0, 0]
    assert inputs.lens.tolist() == [4, 1, 1, 1] and inputs.tables[:, 0].tolist() == [4, 99, 99, 99]
    hidden = GraphInputs(batch=2, max_blocks=3, block_size=16, scratch_block=7, token_ids=False,
                         device=torch.device("cpu"))
    hidden.stage(None, [1, 2], [[0], [1]])
    assert hidden.ids is None and hidden.slots.tolist() == [0, 17]
