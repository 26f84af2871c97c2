"""bfloat16 on the CPU: close to the float32 reference, off only where rounding
can flip a choice.

On the fixture, bf16 lands within ~0.5-1.3% of the float32 values. A few
prompts are further off because a MoE router's top-k has a near-tie in float32
(e.g. experts 7 and 11 at 0.8035 vs 0.8030), which bf16 rounding swaps; so
those checks count agreements instead of demanding every case.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    GOLDEN,
    assert_matches_golden,
    finished_request,
    golden_cases,
    golden_image,
    run_case,
)
from safetensors.torch import load_file

import tidal
from tidal import EngineConfig

EXPECTED = load_file(str(GOLDEN / "expected.safetensors"))
SKILL_CASES = [c for c in golden_cases() if c["kind"] in ("query", "caption", "detect", "point")]
TEXT_CASES = [c for c in SKILL_CASES if c["kind"] in ("query", "caption")]
TOL = 2.5e-2  # bf16 keeps 8 bits: ~0.4% per rounding, a few percent after a network


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def bf16():
    md = tidal.Moondream.from_pretrained(GOLDEN, device="cpu", dtype="bfloat16", engine_config=EngineConfig(trace_logits=True))
    assert md.model.dtype == torch.bfloat16
    yield md
    md.close()


@pytest.fixture(scope="module")
def fp32(golden_md):
    md = tidal.Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(trace_logits=True))
    yield md
    md.close()


@pytest.mark.parametrize("case", golden_cases("image"), ids=lambda c: c["image"])
def test_image_embeddings(bf16, case):
    enc = bf16.encode_image(golden_image(case["image"]))
    assert enc.embeds.dtype == torch.bfloat16
    assert rel(enc.embeds.float(), EXPECTED[case["tensor"]]) <= TOL


def _first_logits(md, case) -> torch.Tensor:
    return finished_request(md, case).trace[0].logits


def test_first_output_logits_agree_except_at_router_ties(bf16, fp32):
    errors = [rel(_first_logits(bf16, c), _first_logits(fp32, c)) for c in SKILL_CASES]
    close = sum(e <= TOL for e in errors)
    assert close >= 0.85 * len(errors), sorted(errors)
    assert max(errors) < 0.3  # a flipped expert moves logits by ~10%, a bug by far more


def test_prefill_logits(bf16, golden_encoded):
    from tidal.core import ImageInput

    errors = []
    for case in golden_cases("prefill_logits"):
        img = bf16.encode_image(golden_image(case["image"]))
        skill, items, bidir = bf16._prepare_query(img, bf16.tokenizer.decode(case["prompt_ids"][3:-1]), False, None, {"temperature": 0, "max_tokens": 1})
        assert items[2:] == case["prompt_ids"] and isinstance(items[1], ImageInput)
        handle = bf16._submit(skill, items, bidir)
        handle.wait()
        errors.append(rel(handle.request.trace[0].logits, EXPECTED[case["tensor"]]))
    assert sum(e <= TOL for e in errors) >= len(errors) - 1, errors


def test_greedy_texts_match_the_reference_nearly_everywhere(bf16):
    agree = 0
    for case in TEXT_CASES:
        try:
            assert_matches_golden(run_case(bf16, case, golden_image(case["image"])), case)
            agree += 1
        except AssertionError:
            pass
    assert agree >= 0.85 * len(TEXT_CASES), f"{agree} of {len(TEXT_CASES)}"
