"""The same reference checks on a CUDA device (skipped where there is none)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    GOLDEN,
    assert_matches_golden,
    case_id,
    golden_cases,
    golden_image,
    run_case,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SKILL_CASES = [c for c in golden_cases() if c["kind"] in ("query", "caption", "detect", "point")]


@pytest.fixture(scope="module")
def cuda_md():
    from tidal import Moondream

    md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32")
    yield md
    md.close()


@pytest.fixture(scope="module")
def cuda_encoded(cuda_md):
    return {n: cuda_md.encode_image(golden_image(n)) for n in ("square378", "wide", "tall", "big", "tiny")}


@pytest.mark.parametrize("case", golden_cases("image"), ids=case_id)
def test_image_embeddings_on_cuda(cuda_encoded, golden_md, case):
    """CUDA float32 equals the CPU path on the same crops. (The CPU path is held to
    the reference in test_golden; crops depend on Pillow's resampling, and other
    Pillow versions than the one the reference used move embeddings by ~1e-3.)"""
    want = golden_md.encode_image(golden_image(case["image"])).embeds
    got = cuda_encoded[case["image"]].embeds.cpu()
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 1e-5, err


@pytest.mark.parametrize("case", SKILL_CASES, ids=case_id)
def test_skill_on_cuda(cuda_md, cuda_encoded, case):
    image = None if case["image"] is None else cuda_encoded[case["image"]]
    assert_matches_golden(run_case(cuda_md, case, image), case)


def test_bfloat16_runs_every_skill():
    from tidal import Moondream

    md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="bfloat16")
    try:
        img = golden_image("wide")
        assert isinstance(md.caption(img, settings={"max_tokens": 8})["caption"], str)
        assert set(md.query(img, "what color", reasoning=True, settings={"max_tokens": 8})) == {"reasoning", "answer"}
        for box in md.detect(img, "dog", settings={"max_objects": 4})["objects"]:
            assert box["x_min"] <= box["x_max"]
        assert len(md.point(img, "dog", settings={"max_objects": 4})["points"]) <= 4
    finally:
        md.close()


def test_one_device_sync_per_decode_step():
    """A batched decode step reads its outputs back once and waits on nothing else."""
    import traceback
    import warnings

    from tidal import Moondream
    from tidal.engine.request import Request

    md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="bfloat16")
    try:
        reqs = []
        for q in ("what color is the car", "how many people are there", "describe this image"):
            skill, items, bidir = md._prepare_query(md.encode_image(golden_image("wide")), q, False, None, {"temperature": 0.7, "max_tokens": 50, "seed": 1})
            reqs.append(Request(skill=skill, pending=items, bidir_len=bidir))
            md.engine.add_request(reqs[-1])
        while any(not r.history or r.pending_len > 1 for r in reqs):
            md.engine.step()
        torch.cuda.synchronize()
        syncs: list[str] = []

        def record(message, *args, **kwargs):  # runs where the sync happened: keep the stack
            if "called a synchronizing" in str(message):
                syncs.append("".join(traceback.format_stack(limit=6)[:-1]))

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                md.engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert len(md.engine.stats.last_chunks) == 3  # the step decoded all three
        assert len(syncs) <= 1, "\n---\n".join(syncs)
        for r in reqs:
            md.engine.abort(r)
    finally:
        md.close()
