"""The items each skill feeds, against the fixture's prompt ids and the reference's rules."""

from __future__ import annotations

import copy

import pytest
from conftest import golden_cases

from tidal.core import CoordInput, ImageInput, SizeInput, StepResult
from tidal.engine.sampling import SamplingParams
from tidal.models.moondream3.config import MoondreamConfig
from tidal.models.moondream3.prompts import PromptBuilder
from tidal.models.moondream3.skills import QuerySkill

BOS, ANSWER, THINKING, COORD = 0, 3, 4, 5


@pytest.fixture(scope="module")
def tok(golden_md):
    return golden_md.tokenizer


@pytest.fixture(scope="module")
def image(golden_md):
    import torch

    return ImageInput(torch.zeros(729, golden_md.config.text.dim), "img")


def _builder(tok, templates: dict | None = None) -> PromptBuilder:
    cfg = MoondreamConfig() if templates is None else MoondreamConfig.from_dict({"tokenizer": {"templates": templates}})
    return PromptBuilder(tok, cfg)


@pytest.mark.parametrize("case", golden_cases("prefill_logits"), ids=lambda c: c["tensor"])
def test_query_prompt_is_the_fixtures(tok, image, case):
    """The fixture's prompt_ids are a query's tokens after the image prefix."""
    question = tok.decode(case["prompt_ids"][3:-1])
    items, bidir = _builder(tok).query(image, question, reasoning=False)
    assert bidir == case["start_pos"] == 730
    assert items[0] == BOS and items[1] is image
    assert items[2:] == case["prompt_ids"]


def test_reasoning_prompt_ends_with_the_thinking_id_and_no_suffix(tok, image):
    q = tok.encode("how many people are there").ids
    items, _ = _builder(tok).query(image, "how many people are there", reasoning=True)
    assert items == [BOS, image, 1, 15381, 2, *q, THINKING]
    plain, _ = _builder(tok).query(image, "how many people are there", reasoning=False)
    assert plain == [BOS, image, 1, 15381, 2, *q, ANSWER]


def test_text_only_query_has_no_bidirectional_prefix(tok):
    items, bidir = _builder(tok).query(None, "what color is the car", reasoning=False)
    assert bidir == 0 and items == [BOS, 1, 15381, 2, *tok.encode("what color is the car").ids, ANSWER]


def test_spatial_refs_sit_between_the_template_prefix_and_the_question(tok, image):
    refs = [[0.25, 0.5], [0.1, 0.2, 0.6, 0.9]]
    items, _ = _builder(tok).query(image, "what is this", reasoning=True, spatial_refs=refs)
    q = tok.encode("what is this").ids
    box = refs[1]
    center = [CoordInput((box[0] + box[2]) / 2), CoordInput((box[1] + box[3]) / 2), SizeInput(box[2] - box[0], box[3] - box[1])]
    assert items == [BOS, image, 1, 15381, 2, CoordInput(0.25), CoordInput(0.5), *center, *q, THINKING]
    assert center[0] == CoordInput(0.35) and center[2] == SizeInput(0.5, pytest.approx(0.7))


@pytest.mark.parametrize("length, word", [("short", 12492), ("normal", 6382), ("long", 4059)])
def test_each_caption_length_has_its_own_template(tok, image, length, word):
    items, bidir = _builder(tok).caption(image, length)
    assert bidir == 730 and items == [BOS, image, 1, 32708, 2, word, ANSWER]


@pytest.mark.parametrize("skill, prefix", [("detect", [1, 7235, 476, 2]), ("point", [1, 2581, 2])])
def test_locate_encodes_the_object_with_a_leading_space(tok, image, skill, prefix):
    items, _ = _builder(tok).locate(image, "red car", skill)
    obj = tok.encode(" red car").ids
    assert items == [BOS, image, *prefix, *obj, ANSWER]


def _reasoning_skill(tok, templates: dict | None = None, max_tokens: int = 16) -> QuerySkill:
    cfg = MoondreamConfig() if templates is None else MoondreamConfig.from_dict({"tokenizer": {"templates": templates}})
    return QuerySkill(tok, cfg.tokenizer, SamplingParams(temperature=0.0, max_tokens=max_tokens), 0, reasoning=True)


def _out(token: int, coord_bin: int = 0) -> StepResult:
    return StepResult(token, coord_bin, (0, 0), False)


def test_reasoning_hands_over_through_the_query_suffix(tok):
    skill = _reasoning_skill(tok)
    assert skill.on_output(_out(20)) == [20]
    assert skill.on_output(_out(COORD, coord_bin=512)) == [CoordInput(0.5)]
    assert skill.on_output(_out(ANSWER)) == [ANSWER]  # the sampled answer id is not fed; the suffix [3] is
    assert not skill.thinking
    assert skill.next_output().banned == ()  # the answer's first token is free
    assert skill.on_output(_out(30)) == [30]
    assert skill.next_output().banned == (ANSWER,)


def test_a_checkpoint_suffix_overrides_the_default(tok, image):
    templates = copy.deepcopy(MoondreamConfig().tokenizer.templates)
    templates["query"]["suffix"] = [3, 17, 18]
    items, _ = _builder(tok, templates).query(image, "what", reasoning=True)
    assert items[-1] == THINKING and 17 not in items
    plain, _ = _builder(tok, templates).query(image, "what", reasoning=False)
    assert plain[-3:] == [3, 17, 18]
    skill = _reasoning_skill(tok, templates)
    assert skill.on_output(_out(20)) == [20]
    assert skill.on_output(_out(ANSWER)) == [3, 17, 18]


def test_reasoning_at_max_tokens_feeds_the_last_token_then_the_suffix(tok):
    templates = copy.deepcopy(MoondreamConfig().tokenizer.templates)
    templates["query"]["suffix"] = [3, 17]
    skill = _reasoning_skill(tok, templates, max_tokens=2)
    assert skill.on_output(_out(20)) == [20]
    assert skill.on_output(_out(21)) == [21, 3, 17]  # the next sample is discarded
    assert skill.reasoning_result()["text"] == tok.decode([20, 21])


def test_reasoning_bans_eos_and_size_from_its_second_token(tok):
    skill = _reasoning_skill(tok)
    assert skill.next_output().banned == ()
    skill.on_output(_out(20))
    assert set(skill.next_output().banned) == {0, 6}


def test_the_python_api_passes_every_argument_to_the_prompt(golden_md, golden_encoded):
    img = golden_encoded["wide"]
    refs = [[0.25, 0.5]]
    _, items, _ = golden_md._prepare_query(img, "what is this", True, refs, None)
    assert items[2:] == golden_md.prompts.query(ImageInput(img.embeds, img.key), "what is this", True, refs)[0][2:]
    assert CoordInput(0.25) in items and items[-1] == THINKING
    for length, word in (("short", 12492), ("long", 4059)):
        _, items, _ = golden_md._prepare_caption(img, length, None)
        assert word in items
    _, items, _ = golden_md._prepare_locate(img, "red car", None, True)
    assert items[-len(golden_md.tokenizer.encode(" red car").ids) - 1 : -1] == golden_md.tokenizer.encode(" red car").ids
