"""Sampling parameters, nucleus/top-k filtering and the seeded sampler."""

from __future__ import annotations

import pytest
import torch

from tidal.engine.sampling import (
    SamplingParams,
    filter_top_p_top_k,
    hashed_uniform,
    sample,
)
from tidal.errors import InvalidRequestError


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    out = filter_top_p_top_k(probs, torch.tensor([0.7]), torch.tensor([0]))
    # mass before 0.5 is 0, before 0.3 is 0.5, before 0.15 is 0.8 > 0.7: cut
    assert out[0].tolist() == pytest.approx([0.0, 0.625, 0.0, 0.375])
    assert filter_top_p_top_k(probs, torch.tensor([1.0]), torch.tensor([0]))[0].tolist() == pytest.approx(probs[0].tolist())


def test_top_k():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.4, 0.3, 0.2, 0.1]])
    out = filter_top_p_top_k(probs, torch.tensor([1.0, 1.0]), torch.tensor([1, 3]))
    assert out[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert out[1].tolist() == pytest.approx([0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0])


def test_hashed_noise_is_uniform_and_keyed():
    u = hashed_uniform(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 50000)
    assert ((u > 0) & (u < 1)).all()
    assert abs(u[0].mean().item() - 0.5) < 0.01 and abs((u[0] < 0.1).float().mean().item() - 0.1) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert torch.equal(u[0], hashed_uniform(torch.tensor([1]), torch.tensor([0]), 50000)[0])


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert sample(logits, [0.0, 0.0], [1.0, 1.0], [0, 0], [0, 0], [0, 0]).tolist() == [1, 0]


def test_seeded_sampling_is_reproducible_and_batch_independent():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    args = ([0.8] * 4, [0.95] * 4, [0] * 4, [11, 12, 13, 14], [5, 5, 5, 5])
    full = sample(logits, *args)
    assert torch.equal(full, sample(logits, *args))
    alone = sample(logits[2:3], [0.8], [0.95], [0], [13], [5])
    assert alone.item() == full[2].item()


def test_sampling_follows_the_distribution():
    p = torch.tensor([0.6, 0.3, 0.1])
    logits = p.log().expand(4000, 3).contiguous()
    n = 4000
    draws = sample(logits, [1.0] * n, [1.0] * n, [0] * n, list(range(n)), [0] * n)
    freq = torch.bincount(draws, minlength=3).float() / n
    assert freq.tolist() == pytest.approx(p.tolist(), abs=0.03)
    nucleus = sample(logits, [1.0] * n, [0.5] * n, [0] * n, list(range(n)), [0] * n)
    assert set(nucleus.tolist()) == {0}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_params_are_rejected(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs).validate()
