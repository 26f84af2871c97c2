"""Sampling parameters, nucleus/top-k filtering and the seeded sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidal.engine.sampling import SamplingParams
from tidal.errors import InvalidRequestError
from tidal.runner.sampler import filter_top_p_top_k, hashed_uniform, sample


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


VOCAB, CONTEXT = 51200, 4096


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 2**70}, "temperature"),
        ({"temperature": 101}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": CONTEXT + 1}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": VOCAB + 1}, "top_k"),
        ({"top_k": 2**63}, "top_k"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ["x"] * 17}, "at most 16"),
        ({"stop": ["x" * 257]}, "limit is 256"),
        ({"stop": ["\ud800"]}, "surrogate"),
        ({"stop": [5]}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
    ],
)
def test_bad_params_are_rejected(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs).validate(VOCAB, CONTEXT)


def test_limits_and_numpy_scalars_are_accepted():
    p = SamplingParams(temperature=np.float32(0.25), top_p=np.float64(1.0), top_k=np.int64(VOCAB), max_tokens=np.int32(CONTEXT), stop=["\n"], seed=2**64 - 1)
    p.validate(VOCAB, CONTEXT)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.25, 1.0, VOCAB, CONTEXT)
    assert all(type(v) in (int, float) for v in (p.temperature, p.top_p, p.top_k, p.max_tokens))
    with pytest.raises(InvalidRequestError, match="top_k"):
        SamplingParams(top_k=np.bool_(True)).validate(VOCAB, CONTEXT)


def test_a_top_p_tie_keeps_the_token_that_reaches_it():
    # the mass before the third token is exactly 0.75, which does not exceed top_p
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    out = filter_top_p_top_k(probs, torch.tensor([0.75]), torch.tensor([0]))
    assert out[0].tolist() == [0.5, 0.25, 0.25, 0.0]
    out = filter_top_p_top_k(probs, torch.tensor([0.7]), torch.tensor([0]))
    assert out[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])


def test_top_k_1_is_greedy_whatever_the_seed():
    torch.manual_seed(1)
    logits = torch.randn(64, 500)
    n = logits.shape[0]
    got = sample(logits, [1.5] * n, [1.0] * n, [1] * n, list(range(n)), [3] * n)
    assert torch.equal(got, logits.argmax(dim=-1))


def test_a_tiny_temperature_is_greedy_and_never_nan():
    torch.manual_seed(2)
    logits = torch.randn(64, 500) * 30
    logits[:, 7] = float("-inf")  # banned ids stay out
    n = logits.shape[0]
    for t in (1e-300, 1e-45, 1e-37, 1e-8):
        got = sample(logits, [t] * n, [0.9] * n, [0] * n, list(range(n)), [0] * n)
        assert torch.equal(got, sample(logits, [0.0] * n, [0.9] * n, [0] * n, [0] * n, [0] * n))
    hot = sample(logits, [100.0] * n, [1.0] * n, [0] * n, list(range(n)), [0] * n)
    assert 7 not in hot.tolist() and not torch.equal(hot, logits.argmax(dim=-1))
