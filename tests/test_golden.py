"""Every case of the golden fixture: the authors' reference output on the tiny checkpoint."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import (
    GOLDEN,
    SHARED_GOLDEN,
    assert_matches_golden,
    case_id,
    golden_cases,
    golden_image,
    run_case,
)
from PIL import Image
from safetensors.torch import load_file

from tidal.models.moondream3.processor import overlap_crops

EXPECTED = load_file(str(GOLDEN / "expected.safetensors"))
SKILL_CASES = [c for c in golden_cases() if c["kind"] in ("query", "caption", "detect", "point")]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_fixture_is_an_unchanged_copy():
    if not SHARED_GOLDEN.is_dir():
        pytest.skip("../shared/golden is not beside the repo")
    for src in SHARED_GOLDEN.rglob("*"):
        if src.is_file():
            copy = GOLDEN / src.relative_to(SHARED_GOLDEN)
            assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest(), copy


@pytest.mark.parametrize("case", golden_cases("image"), ids=case_id)
def test_tiling_and_image_embeddings(golden_md, case):
    crops = overlap_crops(Image.open(golden_image(case["image"])), golden_md.config.vision)
    assert list(crops.tiling) == case["tiling"]
    assert crops.n_crops == case["n_crops"]
    enc = golden_md.encode_image(golden_image(case["image"]))
    assert rel_err(enc.embeds, EXPECTED[case["tensor"]]) <= 1e-4


@pytest.mark.parametrize("case", golden_cases("prefill_logits"), ids=lambda c: c["tensor"])
def test_prefill_logits(golden_md, golden_encoded, case):
    from tidal.cache.kv_pool import KVPool, ReqToTokenPool, SlotAllocator
    from tidal.core import ImageInput
    from tidal.runner.model_runner import ModelRunner, OutputSpec, SeqStep

    model = golden_md.model
    tc = model.config.text
    pool = KVPool(tc.n_layers, 1024, tc.n_kv_heads, tc.head_dim, torch.float32, "cpu")
    table, alloc = ReqToTokenPool(1, tc.max_context, "cpu"), SlotAllocator(1024)
    runner = ModelRunner(model, pool, table)
    row = table.alloc()
    n = case["start_pos"] + len(case["prompt_ids"])
    table.table[row, :n] = torch.tensor(alloc.alloc(n))
    image = ImageInput(golden_encoded[case["image"]].embeds, "k")
    # The image prefix and the prompt in separate steps, as a cached prefix would be.
    runner.forward([SeqStep(row, 0, [0, image], case["start_pos"], None)])
    hidden = runner.forward([SeqStep(row, case["start_pos"], case["prompt_ids"], case["start_pos"], OutputSpec())])
    logits = model.text.logits(hidden)[0]
    assert rel_err(logits, EXPECTED[case["tensor"]]) <= 1e-4


@pytest.mark.parametrize("case", SKILL_CASES, ids=case_id)
def test_skill(golden_md, golden_encoded, case):
    image = None if case["image"] is None else golden_encoded[case["image"]]
    assert_matches_golden(run_case(golden_md, case, image), case)


@pytest.mark.parametrize("case", [c for c in SKILL_CASES if c["image"] in ("wide", None)], ids=case_id)
def test_skill_from_image_file(golden_md, case):
    """The same results when the engine runs the vision encoder itself."""
    assert_matches_golden(run_case(golden_md, case, golden_image(case["image"])), case)
