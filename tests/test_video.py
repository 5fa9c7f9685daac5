"""Video through the whole VLM equals transformers (fp32, CPU) for Qwen2.5-VL (time-aligned M-RoPE) and Qwen3-VL
(a "<t seconds>" text per frame pair), with negative controls; and the video preprocessing's shapes, frame
sampling and resize arithmetic against transformers' own functions.

The prompts are what the 5.23 processors write: the chat template's `<|vision_start|><|video_pad|><|vision_end|>`
with the pad replaced by the processor's own replace_video_token (called on a stub, as the processor itself
cannot be built without torchvision). For Qwen3-VL that nests the per-frame blocks inside the template's
vision_start/end. Text is tokenized one id per character (a stand-in tokenizer: a real one gives fewer tokens
to "<0.3 seconds>", the layout is the same). Pixels come from pixels.preprocess_video on random frames.
"""
import __future__
import ast
import dataclasses
import logging
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.video_utils import VideoMetadata

import model as M
import pixels
import weights
from test_vlm import END, FAMILIES, IMAGE, START, VIDEO, randomize

SPECIAL = {"<|vision_start|>": START, "<|vision_end|>": END, "<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO,
           "<|im_start|>": 248, "<|im_end|>": 249}
PROCESSORS = {"qwen2_5_vl": transformers.Qwen2_5_VLProcessor, "qwen3_vl": transformers.Qwen3VLProcessor}
# two videos: (frames, height, width, sampled frame indices of a 25 fps source of 100 frames)
VIDEOS = [(5, 60, 90, [0, 20, 40, 60, 80]), (4, 90, 60, [0, 33, 66, 99])]
SOURCE_FRAMES, SOURCE_FPS = 100, 25.0
IMAGE_GRID = (1, 4, 6)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(family, hf model, our model loaded from its save_pretrained directory, video settings)."""
    make_cfg, cls = FAMILIES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    cfg = make_cfg(out)
    if request.param == "qwen2_5_vl":
        cfg.vision_config.tokens_per_second = 2  # the released checkpoints' value (the class default is 4)
    torch.manual_seed(0)
    hf = randomize(cls(cfg), seed=1).eval()
    hf.save_pretrained(out)
    p = cfg.vision_config.patch_size
    vcfg = pixels.video_config_from_dir(out / "none", patch_size=p)  # the class defaults, smaller frames
    f = (p * 2) ** 2
    vcfg = dataclasses.replace(vcfg, min_pixels=4 * f, max_pixels=(12 if p == 14 else 32) * f)
    return request.param, hf, weights.from_pretrained(out), vcfg


def tokenize(text: str) -> list[int]:
    ids = []
    for piece in re.split(r"(<\|[a-z_]+\|>)", text):
        ids += [SPECIAL[piece]] if piece in SPECIAL else [2 + ord(c) % 230 for c in piece]
    return ids


def processor_stub(family):
    """The family's processor object without __init__ (which needs torchvision): its replace_*_token and
    get_text_with_replacements are what expand the template's placeholders."""
    proc = object.__new__(PROCESSORS[family])
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    proc.image_processor = types.SimpleNamespace(merge_size=2)
    proc.video_processor = types.SimpleNamespace(merge_size=2, temporal_patch_size=2)
    return proc


def frames_of(video: int, reverse=False) -> np.ndarray:
    n, h, w, _ = VIDEOS[video]
    x = np.random.default_rng(video).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return x[::-1].copy() if reverse else x


def prompt_text(family, items, grids, first=0, layout="5.23"):
    """A user turn holding `items` ("image" / "video" / text) as the chat template renders them, with the pads
    expanded by the processor. layout "4.57": Qwen3-VL's per-frame blocks replace the template's whole
    vision_start/pad/end (transformers 4.57); "no-timestamps": the same without the "<t seconds>" texts.
    grids: the prompt's videos' grids, VIDEOS[first:] their frames."""
    proc, text, videos = processor_stub(family), "<|im_start|>user\n", []
    image_reps, video_reps = [], []
    for item in items:
        if item in ("image", "video"):
            text += f"<|vision_start|><|{item}_pad|><|vision_end|>"
            if item == "image":
                image_reps.append(proc.replace_image_token({"image_grid_thw": torch.tensor([IMAGE_GRID])}, 0))
            else:
                v = len(video_reps)
                md = VideoMetadata(total_num_frames=SOURCE_FRAMES, fps=SOURCE_FPS, frames_indices=VIDEOS[first + v][3])
                video_reps.append(proc.replace_video_token({"video_grid_thw": grids[v:v + 1], "video_metadata": [md]}, 0))
        else:
            text += item
    text += "<|im_end|>\n<|im_start|>assistant\n"
    text = proc.get_text_with_replacements([text], images_replacements=image_reps, videos_replacements=video_reps)[0][0]
    if layout in ("4.57", "no-timestamps"):  # drop the template's own vision_start/end around the frames
        text = re.sub(r"<\|vision_start\|>(?=<[\d.]+ seconds>)", "", text).replace("<|vision_end|>" * 2, "<|vision_end|>")
    if layout == "no-timestamps":
        text = re.sub(r"<[\d.]+ seconds>", "", text)
    return text


def make_batch(family, vcfg, layout="5.23", reverse=False, rows=(("video", "What happens?"),
               ("Look: ", "image", " then ", "video", "Compare."))):
    """Row 0 a video alone (left-padded), row 1 an image and a video: ids, mask, mm types and pixels."""
    pv, grids = zip(*(pixels.preprocess_video(frames_of(v, reverse), vcfg) for v in range(len(VIDEOS))))
    pvv, vgrid = torch.cat(pv), torch.cat(grids)
    seqs, v = [], 0
    for items in rows:
        n = sum(i == "video" for i in items)
        seqs.append(tokenize(prompt_text(family, items, vgrid[v:v + n], v, layout)))
        v += n
    T = max(map(len, seqs))
    ids, mask = torch.zeros(len(seqs), T, dtype=torch.long), torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):], mask[i, T - len(s):] = torch.tensor(s), 1
    n_images = sum(items.count("image") for items in rows)
    igrid = torch.tensor([IMAGE_GRID] * n_images)
    v = vcfg
    pvi = torch.randn(int(igrid.prod(-1).sum()), 3 * v.temporal_patch_size * v.patch_size**2,
                      generator=torch.Generator().manual_seed(7))
    secs = torch.tensor([pixels.second_per_grid(len(idx), SOURCE_FRAMES, SOURCE_FPS) for *_, idx in VIDEOS])
    mm = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pvi, image_grid_thw=igrid,
                pixel_values_videos=pvv, video_grid_thw=vgrid, second_per_grid_ts=secs), mm


def hf_logits(family, hf, b, mm):
    kw = dict(b) if family == "qwen2_5_vl" else {k: v for k, v in b.items() if k != "second_per_grid_ts"}
    with torch.no_grad():
        return hf(**kw, mm_token_type_ids=mm).logits


def our_logits(ours, b):
    with torch.no_grad():
        return ours(**b)


def max_diff(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


def test_prompt_layouts(pair):
    """The processors' prompts: Qwen3-VL a timestamp + block per frame pair (nested in the template's block in
    5.23), Qwen2.5-VL one block of T*h*w/4 pads."""
    family, _, _, vcfg = pair
    b, _ = make_batch(family, vcfg)
    text = prompt_text(family, ["video"], b["video_grid_thw"][:1])
    gt, gh, gw = b["video_grid_thw"][0].tolist()
    pads = "<|video_pad|>" * (gh * gw // 4)
    if family == "qwen3_vl":
        stamps = pixels.frame_timestamps(VIDEOS[0][3], SOURCE_FPS)
        assert len(stamps) == gt == 3 and [f"{t:.1f}" for t in stamps] == ["0.4", "2.0", "3.2"]
        frames = "".join(f"<{t:.1f} seconds><|vision_start|>{pads}<|vision_end|>" for t in stamps)
        assert f"<|vision_start|>{frames}<|vision_end|>" in text
    else:
        assert f"<|vision_start|>{pads * gt}<|vision_end|>" in text


def test_rope_index_with_videos_matches_transformers(pair):
    family, hf, ours, vcfg = pair
    for layout in ("5.23", "4.57") if family == "qwen3_vl" else ("5.23",):
        b, mm = make_batch(family, vcfg, layout)
        ids, mask = b["input_ids"], b["attention_mask"]
        kw = dict(second_per_grid_ts=b["second_per_grid_ts"]) if family == "qwen2_5_vl" else {}
        want_pos, want_delta = hf.model.get_rope_index(ids, mm, image_grid_thw=b["image_grid_thw"],
                                                       video_grid_thw=b["video_grid_thw"], attention_mask=mask, **kw)
        pos, delta = M.rope_index(ids, b["image_grid_thw"], IMAGE, 2, mask, video_grid_thw=b["video_grid_thw"],
                                  video_token_id=VIDEO, second_per_grid_ts=b["second_per_grid_ts"],
                                  tokens_per_second=ours.cfg.tokens_per_second)
        assert torch.equal(pos, want_pos) and torch.equal(delta, want_delta), layout
    if family == "qwen2_5_vl":  # second_per_grid 1.6 s x 2 tokens/s: temporal steps 3.2 -> 0, 3, 6 (truncated)
        first = pos[0, 0, ids[0] == VIDEO]
        assert (first.unique() - first.min()).tolist() == [0, 3, 6]


def test_video_logits_match_transformers(pair):
    """A padded batch: a video alone, and an image then a video; every real position's logits."""
    family, hf, ours, vcfg = pair
    b, mm = make_batch(family, vcfg)
    got, want = our_logits(ours, b), hf_logits(family, hf, b, mm)
    diff = max_diff(got, want, b["attention_mask"])
    print(f"{family}: max |ours - transformers| = {diff:.2e}")
    assert diff <= 1e-4, diff


def test_negative_controls(pair):
    """Frames reversed, the wrong seconds per grid (Qwen2.5-VL), no timestamps or the 4.57 layout (Qwen3-VL)
    move the logits; transformers agrees with us on each variant, so parity is not blind to them."""
    family, hf, ours, vcfg = pair
    b, mm = make_batch(family, vcfg)
    ref = our_logits(ours, b)
    rev, _ = make_batch(family, vcfg, reverse=True)
    assert max_diff(our_logits(ours, rev), ref, b["attention_mask"]) > 1e-3
    if family == "qwen2_5_vl":
        wrong = dict(b, second_per_grid_ts=torch.tensor([0.5, 0.5]))
        got = our_logits(ours, wrong)
        assert max_diff(got, ref, b["attention_mask"]) > 1e-3
        assert max_diff(got, hf_logits(family, hf, wrong, mm), b["attention_mask"]) <= 1e-4
        return
    for layout in ("no-timestamps", "4.57"):
        other, other_mm = make_batch(family, vcfg, layout)
        got = our_logits(ours, other)
        assert (got[:, -1] - ref[:, -1]).abs().max() > 1e-3, layout  # the next-token prediction changes
        assert max_diff(got, hf_logits(family, hf, other, other_mm), other["attention_mask"]) <= 1e-4, layout


def test_video_pad_without_video_is_text(pair):
    """A generated video-pad id in a text continuation is text, as in transformers (no mm type for it)."""
    _, _, ours, _ = pair
    ids = torch.tensor([[5, 6, VIDEO, 7]])
    pos, delta = M.rope_index(ids, None, IMAGE, 2, video_token_id=VIDEO, tokens_per_second=2)
    assert pos[0, 0].tolist() == [0, 1, 2, 3] and delta.item() == 0
    with pytest.raises(ValueError, match="more video tokens than videos"):
        M.rope_index(ids, None, IMAGE, 2, video_grid_thw=torch.zeros(0, 3, dtype=torch.long), video_token_id=VIDEO)


# ---------------------------------------------------------------------------------------------------------------
# preprocessing


def hf_function(path: str, name: str, cls: str | None = None):
    """A function (or a class's method) from transformers' source, compiled alone: the video processor modules
    refuse to import without torchvision, but their arithmetic does not need it."""
    file = Path(transformers.__file__).parent / path
    tree = ast.parse(file.read_text())
    body = tree.body if cls is None else next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.decorator_list = []
    ns = dict(math=math, np=np, torch=torch, logger=logging.getLogger(__name__))
    exec(compile(ast.Module([fn], []), str(file), "exec", flags=__future__.annotations.compiler_flag), ns)
    return ns[name], ns


Q2, Q3 = "models/qwen2_vl/video_processing_qwen2_vl.py", "models/qwen3_vl/video_processing_qwen3_vl.py"


@pytest.mark.parametrize("total,fps", [(100, 25.0), (10, 30.0), (7, 30.0), (3000, 30.0), (61, 29.97), (5, 1.0)])
def test_sample_frame_indices_match_transformers(total, fps):
    q2, _ = hf_function(Q2, "sample_frames", "Qwen2VLVideoProcessor")
    q3, _ = hf_function(Q3, "sample_frames", "Qwen3VLVideoProcessor")
    md = VideoMetadata(total_num_frames=total, fps=fps)
    for max_frames in (768, 16):
        stub = types.SimpleNamespace(num_frames=None, fps=2.0, temporal_patch_size=2, min_frames=4,
                                     max_frames=max_frames)
        want2, want3 = q2(stub, md).tolist(), q3(stub, md).tolist()
        assert pixels.sample_frame_indices(total, fps, 2.0, 4, max_frames, 2) == want2
        assert pixels.sample_frame_indices(total, fps, 2.0, 4, max_frames, 2, text_timestamps=True) == want3
    if total == 100:  # 4 s at 2 fps: 8 frames
        assert want2 == [0, 12, 25, 37, 50, 62, 75, 87] and want3 == [0, 14, 28, 42, 57, 71, 85, 99]


SIZES = [(5, 60, 90), (8, 1080, 1920), (4, 20, 300), (3, 480, 640), (64, 720, 1280), (2, 33, 33), (9, 2000, 40)]


@pytest.mark.parametrize("qwen3", [False, True])
def test_resize_and_token_counts_match_transformers(qwen3):
    """video_resize == the processors' smart_resize, video_tokens == get_num_of_video_patches / 4 (Qwen3-VL
    also with the per-frame cap)."""
    base = pixels.video_config_from_dir("/nonexistent", patch_size=16 if qwen3 else 14)
    num_patches, ns = hf_function(Q3 if qwen3 else Q2, "get_num_of_video_patches",
                                  "Qwen3VLVideoProcessor" if qwen3 else "Qwen2VLVideoProcessor")
    ns["smart_resize"] = hf_function(Q3 if qwen3 else Q2, "smart_resize")[0]
    for cap in (False, True) if qwen3 else (False,):
        cfg = dataclasses.replace(base, cap_pixels_per_frame=cap)
        stub = types.SimpleNamespace(size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
                                     patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2,
                                     cap_pixels_per_frame=cap, max_video_tokens=cfg.max_video_tokens)
        for t, h, w in SIZES:
            assert pixels.video_tokens(t, h, w, cfg) * 4 == num_patches(stub, t, h, w, {}), (cap, t, h, w)


@pytest.mark.parametrize("qwen3", [False, True])
def test_preprocess_video_layout(qwen3):
    p = 16 if qwen3 else 14
    cfg = dataclasses.replace(pixels.video_config_from_dir("/nonexistent", patch_size=p),
                              min_pixels=4 * (2 * p) ** 2, max_pixels=24 * (2 * p) ** 2)
    frames = np.random.default_rng(0).integers(0, 256, (5, 300, 500, 3), dtype=np.uint8)  # odd count, too big
    pv, grid = pixels.preprocess_video(frames, cfg)
    gt, gh, gw = grid[0].tolist()
    assert gt == 3 and pv.shape == (gt * gh * gw, 3 * 2 * p * p)
    budget = (4 if qwen3 else 1) * gh * gw * p * p  # Qwen3-VL bounds frames x h x w (4 frames: 5 rounds to 4)
    assert cfg.min_pixels <= budget <= cfg.max_pixels
    assert pixels.video_tokens(5, 300, 500, cfg) == pv.shape[0] // 4
    rows = pv.view(gt, gh * gw, 3, 2, p, p)  # (frame pair, patch, C, frame in pair, p, p)
    assert torch.equal(rows[-1, :, :, 0], rows[-1, :, :, 1])  # the 5th frame repeated to fill the last pair
    assert not torch.equal(rows[0, :, :, 0], rows[0, :, :, 1])
    # PIL frames give the same rows; a frame already at its size is only normalised, patch (0, 0) of frame 0
    assert torch.equal(pixels.preprocess_video([Image.fromarray(f) for f in frames], cfg)[0], pv)
    small = frames[:2, : 4 * p, : 4 * p]
    pv2, grid2 = pixels.preprocess_video(small, dataclasses.replace(cfg, min_pixels=(4 * p) ** 2 // 2))
    assert grid2.tolist() == [[1, 4, 4]]
    mean, std = torch.tensor(cfg.image_mean) * 255, torch.tensor(cfg.image_std) * 255
    want = (torch.from_numpy(small[0, :p, :p]).float() - mean) / std  # (p, p, C)
    assert torch.equal(pv2.view(16, 3, 2, p, p)[0, :, 0], want.permute(2, 0, 1))
