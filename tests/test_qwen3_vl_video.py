"""Qwen3-VL video input held to transformers (float32, CPU).

The processor: transformers' own Qwen3VLVideoProcessor pieces (frame sampling,
smart resize, fused rescale + normalize, patchify) and Qwen3VLProcessor's
frame times give the reference; the resize is torch's antialiased bicubic on
uint8, the path torchvision's resize takes for uint8 tensors on the CPU
(torchvision itself is not installed here). The model: logits of prompts
with a video (and a video beside an image) within 1e-4 of
Qwen3VLForConditionalGeneration's, alone, batched and with the video's
frames served from the prefix cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tidal
from tidal.core import ImageRef
from tidal.engine.engine import EngineConfig
from tidal.models.qwen3_vl.video import (
    VideoProcessorConfig,
    prepare_video,
    process_frame_group,
)

transformers = pytest.importorskip("transformers")

import test_qwen3_vl as vl  # noqa: E402

VIDEO, START, END = 8, 5, 6  # <|md_reserved_7|>, <|md_reserved_4|>, <|md_reserved_5|> of the test tokenizer
VIDEO_PROCESSOR = {"patch_size": 8, "temporal_patch_size": 2, "merge_size": 2, "size": {"shortest_edge": 1024, "longest_edge": 40_000}, "fps": 2, "min_frames": 4, "max_frames": 768, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
CFG = VideoProcessorConfig.from_dict(VIDEO_PROCESSOR)
# the image test's template, with video parts as Qwen's template writes them: vision start, video pad, vision end
CHAT_TEMPLATE = vl.CHAT_TEMPLATE.replace("{% else %}{{ p.text }}", "{% elif p.type == 'video' %}<|md_reserved_4|><|md_reserved_7|><|md_reserved_5|>{% else %}{{ p.text }}")


def _video(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def _hf_processor():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
    )

    return Qwen3VLVideoProcessor(**VIDEO_PROCESSOR)


def _hf_video(video: np.ndarray, fps: float | None):
    """transformers' processing of one video: (pixel_values_videos, grid (t, h, w), frame times)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize
    from transformers.video_utils import VideoMetadata

    proc = _hf_processor()
    meta = VideoMetadata(total_num_frames=video.shape[0], fps=fps)
    indices = proc.sample_frames(meta)  # sets meta.fps to 24 when it is unknown
    frames = torch.from_numpy(video[indices]).permute(0, 3, 1, 2)[None]  # [1, T, 3, H, W] uint8
    h, w = smart_resize(frames.shape[1], frames.shape[3], frames.shape[4], temporal_factor=proc.temporal_patch_size, factor=proc.patch_size * proc.merge_size, min_pixels=proc.size.shortest_edge, max_pixels=proc.size.longest_edge)
    if (h, w) != tuple(frames.shape[3:]):  # torchvision's resize of uint8 on the CPU: torch's own uint8 bicubic
        frames = F.interpolate(frames[0], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[None]
    mean, std, _ = proc._fuse_mean_std_and_rescale_factor(True, tuple(proc.image_mean), tuple(proc.image_std), True, proc.rescale_factor)
    x = (frames.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)  # torchvision's normalize
    patches, gt, gh, gw = proc.patchify(x, proc.patch_size, proc.merge_size, proc.temporal_patch_size)
    times = Qwen3VLProcessor._calculate_timestamps(None, indices, meta.fps, proc.temporal_patch_size)
    return patches[0], (gt, gh, gw), times


@pytest.mark.parametrize(
    "frames, h, w, fps",
    [(9, 40, 56, 4.0), (30, 70, 33, None), (5, 64, 64, 2.0), (7, 12, 150, 10.0), (3, 300, 200, 1.0)],
)
def test_video_processing_equals_transformers(frames, h, w, fps):
    video = _video(frames, h, w, seed=frames)
    want, grid, times = _hf_video(video, fps)
    prepared = prepare_video(video, fps, CFG)
    got = [process_frame_group(torch.from_numpy(g.frames), CFG) for g in prepared.groups]
    assert len(got) == grid[0] and all(g[1] == (1, grid[1], grid[2]) for g in got)
    assert torch.equal(torch.cat([g[0] for g in got]), want)
    assert prepared.timestamps == times


def test_a_one_frame_video_is_refused():
    with pytest.raises(tidal.InvalidRequestError, match="at least 2 frames"):
        prepare_video(_video(1, 40, 40, 0), 2.0, CFG)


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    hf, folder = vl._save(tmp_path_factory, request.param)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PROCESSOR))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    hf.config.video_token_id, hf.config.vision_start_token_id, hf.config.vision_end_token_id = VIDEO, START, END
    hf.model.config.video_token_id = VIDEO
    llm = tidal.LLM.from_pretrained(folder, device="cpu", dtype="float32", engine_config=EngineConfig(trace_logits=True, max_running=8))
    yield hf, llm
    llm.close()


def _items(llm, ids, images=None, videos=None):
    req = {"prompt_token_ids": ids}
    if images is not None:
        req["images"] = images
    if videos is not None:
        req["videos"] = videos
    _, items = llm._prepare(req, tidal.SamplingParams(max_tokens=4), ignore_eos=True)
    return items


def _hf_logits(hf, items, images, videos):
    """transformers' logits over tidal's expanded prompt: each image or video
    frame group as its placeholder tokens, the pixels processed by transformers."""
    ids, types, image_patches, image_grids, video_patches, video_grids = [], [], [], [], [], []
    images, videos = list(images), list(videos)
    groups_left = 0
    for item in items:
        if not isinstance(item, ImageRef):
            ids.append(item)
            types.append(0)
        elif item.key.startswith("video:"):
            if groups_left == 0:
                v, fps = videos.pop(0)
                patches, grid, _ = _hf_video(v, fps)
                video_patches.append(patches)
                video_grids.append(grid)
                groups_left = grid[0]
            groups_left -= 1
            ids += [VIDEO] * len(item)
            types += [2] * len(item)
        else:
            patches, grid = vl.process_image(torch.from_numpy(images.pop(0)), vl.ImageProcessorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vl.PROCESSOR.items()}))
            image_patches.append(patches)
            image_grids.append(grid)
            ids += [vl.IMAGE] * len(item)
            types += [1] * len(item)
    kwargs = {"mm_token_type_ids": torch.tensor([types])}
    if image_patches:
        kwargs |= {"pixel_values": torch.cat(image_patches), "image_grid_thw": torch.tensor(image_grids)}
    if video_patches:
        kwargs |= {"pixel_values_videos": torch.cat(video_patches), "video_grid_thw": torch.tensor(video_grids)}
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), **kwargs).logits[0].float()


CASES = {
    "video": ([11, 20, START, VIDEO, END, 30, 31], [], [((9, 40, 56), 4.0)]),
    "video and image": ([11, START, vl.IMAGE, END, 12, START, VIDEO, END, 40], [(40, 56, 1)], [((6, 48, 40), None)]),
}


def _case(name):
    ids, image_specs, video_specs = CASES[name]
    images = [vl._image(*s) for s in image_specs]
    videos = [(_video(*shape, seed=sum(shape)), fps) for shape, fps in video_specs]
    return ids, images, videos


def _request(ids, images, videos):
    req = {"prompt_token_ids": ids, "videos": [{"frames": v, "fps": fps} if fps is not None else v for v, fps in videos]}
    if images:
        req["images"] = images
    return req


def _run(llm, requests, max_tokens):
    params = tidal.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    handles = [llm._submit(*llm._prepare(r, params, ignore_eos=True)) for r in requests]
    out = []
    for h in handles:
        res = h.wait()
        out.append((res["token_ids"], torch.stack([t.logits.flatten() for t in h.request.trace])))
    return out


def test_the_prompt_holds_each_frame_group_with_its_time(pair):
    _, llm = pair
    ids, images, videos = _case("video")
    items = _items(llm, ids, videos=[{"frames": videos[0][0], "fps": videos[0][1]}])
    _, _, times = _hf_video(*videos[0])
    at = ids.index(VIDEO)
    assert items[:at] == ids[:at] and items[-(len(ids) - at - 1) :] == ids[at + 1 :]
    body, expected = items[at : len(items) - (len(ids) - at - 1)], []
    for t in times:  # Qwen3VLProcessor.replace_video_token's text, token for token
        expected += llm.tokenizer.encode(f"<{t:.1f} seconds>", add_special_tokens=False).ids + [START, "group", END]
    assert [("group" if isinstance(i, ImageRef) else i) for i in body] == expected
    groups = [i for i in body if isinstance(i, ImageRef)]
    assert len({g.key for g in groups}) == len(groups) == 2 and all(len(g) == 8 for g in groups)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(pair, name):
    hf, llm = pair
    ids, images, videos = _case(name)
    ((tokens, logits),) = _run(llm, [_request(ids, images, videos)], 5)
    # compare the outputs whose inputs hold no generated image or video token id (transformers counts them by id)
    n = next((i + 1 for i, t in enumerate(tokens) if t in (VIDEO, vl.IMAGE)), len(tokens))
    items = _items(llm, ids, images, _request(ids, images, videos)["videos"]) + tokens[: n - 1]
    full = _hf_logits(hf, items, images, videos)
    want = full[len(full) - n :]
    assert _rel(logits[:n], want) <= 1e-4, _rel(logits[:n], want)
    assert tokens[:n] == want.argmax(-1).tolist()


def test_batched_and_cached_give_the_same_logits(pair):
    _, llm = pair
    reqs = [_request(*_case(n)) for n in sorted(CASES)]
    alone = [_run(llm, [r], 5)[0] for r in reqs]
    before = llm.engine.snapshot()["cache_hit_positions"]
    together = _run(llm, reqs, 5)  # the frame groups' KV now comes from the cache
    for (ta, la), (tb, lb) in zip(alone, together):
        assert ta == tb and _rel(lb, la) <= 1e-5
    assert llm.engine.snapshot()["cache_hit_positions"] - before >= 16  # both videos' frame groups at least


def test_video_frames_in_any_form_give_the_same_prompt(pair):
    from PIL import Image

    _, llm = pair
    video = _video(6, 48, 40, seed=3)
    as_array = _items(llm, [START, VIDEO, END], videos=[video])
    as_list = _items(llm, [START, VIDEO, END], videos=[[Image.fromarray(f) for f in video]])
    assert [getattr(i, "key", i) for i in as_array] == [getattr(i, "key", i) for i in as_list]
    at_24 = _items(llm, [START, VIDEO, END], videos=[{"frames": video, "fps": 24}])
    assert [getattr(i, "key", i) for i in at_24] == [getattr(i, "key", i) for i in as_array]  # 24 fps is the default


def test_bad_videos_say_what_is_accepted(pair):
    _, llm = pair
    video = _video(6, 48, 40, seed=3)
    with pytest.raises(tidal.InvalidRequestError, match="1 video placeholders .* 2 videos"):
        llm.generate({"prompt_token_ids": [START, VIDEO, END], "videos": [video, video]})
    with pytest.raises(tidal.InvalidRequestError, match=r"uint8 of shape \(T, H, W, 3\)"):
        llm.generate({"prompt_token_ids": [VIDEO], "videos": [video[..., 0]]})
    with pytest.raises(tidal.InvalidRequestError, match="fps must be a positive number"):
        llm.generate({"prompt_token_ids": [VIDEO], "videos": [{"frames": video, "fps": 0}]})
    with pytest.raises(tidal.InvalidRequestError, match="'frames' and optionally 'fps'"):
        llm.generate({"prompt_token_ids": [VIDEO], "videos": [{"pixels": video}]})
    with pytest.raises(tidal.InvalidRequestError, match="one size"):
        llm.generate({"prompt_token_ids": [VIDEO], "videos": [[video[0], video[1, :40]]]})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())



def _apng(frames: np.ndarray, ms: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(buf, format="PNG", save_all=True, append_images=rest, duration=ms, loop=0)
    return buf.getvalue()


def test_animated_images_decode_to_frames_and_their_rate():
    from tidal.errors import ImageError
    from tidal.images import animation_frames

    video = _video(5, 24, 32, seed=4)
    frames, fps = animation_frames(_apng(video, 100))
    assert np.array_equal(frames, video) and fps == pytest.approx(10.0)
    still, none = animation_frames(_apng(video[:1], 0))
    assert still.shape == (1, 24, 32, 3) and none is None
    with pytest.raises(ImageError, match="could not be decoded"):
        animation_frames(b"GIF89a not really")


def test_chat_completions_with_a_video_part(pair):
    """A video_url part (an animated PNG as a data URL) becomes the template's
    video placeholder and the request's video: the answer equals LLM.generate's."""
    import base64

    import openai
    from conftest import LiveServer

    from tidal.server.app import create_llm_app
    from tidal.server.config import ServerConfig

    _, llm = pair
    video = _video(6, 48, 40, seed=5)
    url = "data:image/png;base64," + base64.b64encode(_apng(video, 250)).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "video"}, {"type": "text", "text": "this"}]}]
    prompt = llm.chat_template.render(messages)
    want = llm.generate({"prompt": prompt, "videos": [{"frames": video, "fps": 4}]}, tidal.SamplingParams(temperature=0.0, max_tokens=5), ignore_eos=True)
    config = ServerConfig(model_name="qwen3-vl-test")
    srv = LiveServer(llm, config, app=create_llm_app(llm, config))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        content = [{"type": "text", "text": "what is"}, {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "this"}]
        got = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], max_tokens=5, temperature=0)
        assert got.choices[0].message.content == want["text"]
        assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"] > 2 * 8  # two frame groups of 8 positions
    finally:
        srv.stop()


def test_chat_takes_image_and_video_parts_in_order(pair):
    _, llm = pair
    video, image = _video(6, 48, 40, seed=6), vl._image(40, 56, 2)
    messages = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "and"}, {"type": "image", "image": image}]}]
    params = tidal.SamplingParams(temperature=0.0, max_tokens=4)
    prompt = llm.chat_template.render([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "and"}, {"type": "image"}]}])
    want = llm.generate({"prompt": prompt, "videos": [video], "images": [image]}, params, ignore_eos=True)
    got = llm.chat(messages, params, ignore_eos=True)
    assert got["token_ids"] == want["token_ids"] and got["usage"] == want["usage"]
    with pytest.raises(tidal.InvalidRequestError, match="under 'video'"):
        llm.chat([{"role": "user", "content": [{"type": "video"}]}], params)


def test_placeholders_without_their_media_are_refused(pair):
    _, llm = pair
    with pytest.raises(tidal.InvalidRequestError, match="1 video placeholders .* but no videos"):
        llm.generate({"prompt_token_ids": [START, VIDEO, END]})
    with pytest.raises(tidal.InvalidRequestError, match="2 image placeholders .* but no images"):
        llm.generate({"prompt_token_ids": [vl.IMAGE, 11, vl.IMAGE]})


def test_images_and_frame_groups_encoded_together_equal_each_alone(pair):
    """The engine encodes a step's new images in one vision-tower run (attention
    stays within each): embeddings and deepstack features as if alone."""
    _, llm = pair
    model = llm.model
    groups = prepare_video(_video(6, 48, 40, seed=7), None, model.video.processor).groups
    payloads = [vl._image(40, 56, 1), groups[0], vl._image(33, 70, 3), groups[1]]
    together = model.encode_images(payloads)
    for payload, got in zip(payloads, together):
        alone = model.encode_image(payload)
        assert got.embeds.shape == alone.embeds.shape and got.extra.shape == alone.extra.shape
        assert _rel(got.embeds, alone.embeds) <= 1e-5 and _rel(got.extra, alone.extra) <= 1e-5
        assert torch.equal(got.rope, alone.rope) and got.rope_advance == alone.rope_advance


def test_a_steps_new_images_go_through_the_encoder_together(pair, monkeypatch):
    _, llm = pair
    calls = []
    encode = llm.model.encode_images

    def counted(payloads):
        calls.append(len(payloads))
        return encode(payloads)

    monkeypatch.setattr(llm.model, "encode_images", counted)
    ids, images, videos = _case("video and image")
    videos = [(v + 1, fps) for v, fps in videos]  # new pixels: nothing cached
    images = [im + 1 for im in images]
    _run(llm, [_request(ids, images, videos)], 2)
    assert calls == [3]  # the image and the video's two frame groups, in one call


def test_bad_video_parts_get_a_clear_400(pair):
    import base64

    import openai
    from conftest import LiveServer

    from tidal.server.app import create_llm_app
    from tidal.server.config import ServerConfig

    _, llm = pair
    config = ServerConfig(model_name="qwen3-vl-test")
    srv = LiveServer(llm, config, app=create_llm_app(llm, config))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        not_an_image = "data:image/gif;base64," + base64.b64encode(b"GIF89a not really").decode()
        for url, match in ((not_an_image, "could not be decoded"), ("https://example.com/clip.gif", "remote video_url URLs are not fetched"), ("data:image/gif;base64,@@@@", "video_url is not valid base64")):
            content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "what"}]
            with pytest.raises(openai.BadRequestError, match=match):
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], max_tokens=2)
    finally:
        srv.stop()
