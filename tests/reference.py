"""Helpers shared by tests: deterministic prompts, HF reference runs, engine runs."""
from __future__ import annotations

import asyncio

import torch

from raypp.model.sampling_params import SamplingParams


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n argmax tokens with HF's own KV cache; EOS is a token like any other (like ignore_eos).

    A plain loop rather than generate(): its min_new_tokens processor would mask EOS.
    """
    out = model(torch.tensor([prompt]), use_cache=True)
    ids = []
    for _ in range(n):
        ids.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[ids[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return ids


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


async def collect(engine, prompt, params, request_id=None) -> list[int]:
    ids = []
    async for out in engine.generate(prompt, params, request_id):
        ids += out.new_token_ids
    return ids


def run_all(engine, prompts, params) -> list[list[int]]:
    """Every prompt at once through the engine (continuous batching)."""
    async def main():
        return await asyncio.gather(*[collect(engine, p, params) for p in prompts])
    return asyncio.run(main())


def run_each(engine, prompts, params) -> list[list[int]]:
    """Each prompt alone."""
    return [asyncio.run(collect(engine, p, params)) for p in prompts]


def all_blocks_free(engine) -> bool:
    """Once the steps still in flight behind finished sequences have come back."""
    asyncio.run(engine.wait_idle())
    stats = engine.stats()
    return stats.kv_blocks_free == stats.kv_blocks_total
