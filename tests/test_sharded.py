"""Every TP x PP layout computes what the unsharded model computes.

Real processes (torch.multiprocessing, gloo), no Ray: each process is one
(stage, tp_rank) StageWorker.  All ranks build the same step inputs; after each
step the last stage's TP rank 0 broadcasts the sampled tokens so every rank can
form the next step, as the engine's scheduler would.
"""

import pytest
import torch
import torch.distributed as dist

from raypp.model.config import ModelConfig
from raypp.parallel.layout import make_layout
from raypp.runtime.step import PLACEHOLDER, Placeholder, StepInput
from raypp.runtime.worker import StageWorker
from tests.ranks import run_ranks
from tests.reference import greedy, random_prompts

LENGTHS = [7, 20, 3]
NEW_TOKENS = 8
BLOCK = 16


def generate_on_layout(rank, world, port, path, tp, pp, stage_layers, prompts, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = ModelConfig.from_dir(path)
    layout = make_layout(cfg, tp, pp, stage_layers)
    stage, tp_rank = divmod(rank, tp)
    worker = StageWorker(path, "float32", layout, stage, tp_rank, num_blocks=len(prompts) * 4, block_size=BLOCK)
    tables = [list(range(i * 4, i * 4 + 4)) for i in range(len(prompts))]
    lens = [len(p) for p in prompts]
    out = worker.execute(StepInput(sum(prompts, []), lens, lens, tables, [], all_logits=True))
    sampler = layout.rank(pp - 1, 0)
    logits = out.logits
    # Greedy first token from the prefill logits, then decode step by step.
    last = None if logits is None else [lg[-1].argmax().item() for lg in logits.split(lens)]
    box = [last]
    dist.broadcast_object_list(box, src=sampler)
    generated = [[t] for t in box[0]]
    n = len(prompts)
    for step_id in range(1, NEW_TOKENS):
        seq_lens = [len(p) + len(g) for p, g in zip(prompts, generated)]
        # From the second decode step on, stage 0 takes its input ids from the last stage directly.
        placeholders = [Placeholder(i, step_id - 1, i) for i in range(n)] if step_id > 1 else []
        ids = [PLACEHOLDER] * n if placeholders else [g[-1] for g in generated]
        step = StepInput(ids, [1] * n, seq_lens, tables, sample_rows=list(range(n)),
                         params=[greedy(NEW_TOKENS)] * n, seeds=[0] * n,
                         output_positions=[len(g) for g in generated], step_id=step_id,
                         placeholders=placeholders, returned_upto=step_id - 2)
        box = [worker.execute(step).token_ids]
        dist.broadcast_object_list(box, src=sampler)
        for g, t in zip(generated, box[0]):
            g.append(t)
    if rank == sampler:
        # As a numpy array: pickled by value.  A torch tensor would travel as a shared-memory fd
        # that dies with this process, which may exit before the parent reads the queue.
        results.put((logits.numpy(), generated, worker.bytes_loaded))
    dist.barrier()
    dist.destroy_process_group()


def run_layout(path, tp, pp, prompts, stage_layers=None):
    (logits, generated, _), = run_ranks(generate_on_layout, tp * pp, (str(path), tp, pp, stage_layers, prompts), 1)
    return torch.from_numpy(logits), generated


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    prompts = random_prompts(ModelConfig.from_dir(tiny_ckpt).vocab_size, LENGTHS, seed=3)
    return prompts, run_layout(tiny_ckpt, 1, 1, prompts)


LAYOUTS = [(tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2, 4) if tp * pp <= 8 and (tp, pp) != (1, 1)]


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_layout_matches_unsharded(tiny_ckpt, reference, tp, pp):
    prompts, (ref_logits, ref_tokens) = reference
    logits, tokens = run_layout(tiny_ckpt, tp, pp, prompts)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert tokens == ref_tokens


@pytest.mark.parametrize("stage_layers", [[1, 7], [5, 3], [2, 1, 5]])
def test_uneven_stage_split_matches_unsharded(tiny_ckpt, reference, stage_layers):
    prompts, (ref_logits, ref_tokens) = reference
    logits, tokens = run_layout(tiny_ckpt, 1, len(stage_layers), prompts, stage_layers)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert tokens == ref_tokens
