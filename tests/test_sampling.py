"""Sampling filters against a direct computation: what top-k and top-p keep, and the
distribution the seeded draws follow."""
import torch

from raypp.model.sampling import sample
from raypp.model.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 4.0])


def direct_probs(logits, temperature, top_k, top_p):
    """Written out by hand: sort, cut at k, cut where the mass before a token reaches p, renormalise."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    z = torch.softmax(logits / temperature, -1)
    kept, mass = [], 0.0
    zk = torch.softmax(torch.tensor([float(logits[i]) / temperature for i in order[:top_k or len(order)]]), -1)
    for rank, i in enumerate(order[:top_k or len(order)]):
        if mass >= top_p:
            break
        kept.append(i)
        mass += float(zk[rank])
    probs = torch.zeros_like(z)
    for i in kept:
        probs[i] = z[i]
    return probs / probs.sum()


def draws(params, n=4000):
    return torch.tensor([sample(LOGITS[None], [params], [s], [0])[0][0] for s in range(n)])


def test_top_k_and_top_p_keep_exactly_the_direct_sets():
    for top_k, top_p in [(3, 1.0), (0, 0.6), (4, 0.8), (1, 1.0)]:
        p = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
        allowed = set(torch.nonzero(direct_probs(LOGITS, 0.7, top_k, top_p)).flatten().tolist())
        assert set(draws(p, 400).tolist()) <= allowed, (top_k, top_p)


def test_seeded_draws_follow_the_direct_distribution():
    p = SamplingParams(temperature=1.3, top_k=5, top_p=0.95)
    expect = direct_probs(LOGITS, 1.3, 5, 0.95)
    got = torch.bincount(draws(p), minlength=len(LOGITS)).float() / 4000
    assert (got - expect).abs().max() < 0.03, (got, expect)


def test_the_same_seed_and_position_draw_the_same_token():
    p = SamplingParams(temperature=1.0)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).repeat(3, 1)
    a = sample(logits, [p] * 3, [7, 7, 8], [4, 4, 4])[0]
    assert a[0] == a[1] and sample(logits[:1], [p], [7], [4])[0] == a[:1]
