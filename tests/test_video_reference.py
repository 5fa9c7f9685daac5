"""Video preprocessing is bit-identical to transformers' own video processors (5.23.0, CPU): Qwen2VLVideoProcessor
(Qwen2.5-VL) and Qwen3VLVideoProcessor (Qwen3-VL), on the frames, settings and outputs stored in
tests/data/video_reference.npz: pixel_values_videos and video_grid_thw, the frames the processor samples, and the
time it gives each frame pair (Qwen2_5_VLProcessor's second_per_grid_ts, Qwen3VLProcessor's "<t seconds>" text).

Those processors need torchvision, which cannot be installed beside this project's torch, so the outputs were made
once in a separate venv; to regenerate them (the venv's set-up is in the script's docstring):

    /work/oracle/bin/python tests/make_video_reference.py

Settings come the way a user gets them: the processor's saved video_preprocessor_config.json, read by
pixels.video_config_from_dir. Each comparison has a negative control that must fail.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pixels

REF = np.load(Path(__file__).resolve().parent / "data" / "video_reference.npz")
CASES = REF["cases"].tolist()
SAMPLED = [c for c in CASES if "sample" in c]


def load(name: str, tmp_path: Path):
    """(facts, our VideoConfig from the case's saved config, the frames given to the processor)."""
    facts = json.loads(str(REF[f"{name}__facts"]))
    (tmp_path / "video_preprocessor_config.json").write_text(facts["config_json"])
    cfg = pixels.video_config_from_dir(tmp_path)
    frames = REF[f"{name}__frames"] if facts["source"] is None else REF[f"source__{facts['source']}"][:facts["first"]]
    return facts, cfg, frames


def sampled(facts: dict, cfg: pixels.VideoConfig, text_timestamps: bool | None = None) -> list[int]:
    """Our frame indices for the case: sample_frame_indices where the processor samples, else the caller's."""
    if not cfg.do_sample_frames:
        return facts["frames_indices"]
    return pixels.sample_frame_indices(facts["total_num_frames"], facts["video_fps"], cfg.fps, cfg.min_frames,
                                       cfg.max_frames, cfg.temporal_patch_size,
                                       cfg.text_timestamps if text_timestamps is None else text_timestamps)


@pytest.mark.parametrize("name", CASES)
def test_config_from_saved_file(name, tmp_path):
    """video_config_from_dir reads the processor's own file to the settings the processor ran with."""
    facts, cfg, _ = load(name, tmp_path)
    settings, size = facts["settings"], facts["settings"]["size"]
    assert cfg.text_timestamps == (facts["family"] == "Qwen3VLVideoProcessor")
    assert (cfg.min_pixels, cfg.max_pixels) == (size["shortest_edge"], size["longest_edge"])
    for key in ("do_sample_frames", "fps", "min_frames", "max_frames", "cap_pixels_per_frame", "max_video_tokens"):
        if key in settings:
            assert getattr(cfg, key) == settings[key], key


@pytest.mark.parametrize("name", CASES)
def test_pixel_values_match_transformers(name, tmp_path, monkeypatch):
    facts, cfg, frames = load(name, tmp_path)
    idx = sampled(facts, cfg)
    if cfg.do_sample_frames:
        frames = frames[idx]
    want = torch.from_numpy(REF[f"{name}__pixel_values_videos"])
    want_grid = torch.from_numpy(REF[f"{name}__video_grid_thw"])
    pv, grid = pixels.preprocess_video(frames, cfg)
    assert torch.equal(grid, want_grid), (grid, want_grid)
    assert pv.dtype == torch.float32 and pv.shape == want.shape
    diff = (pv - want).abs().max().item()
    print(f"{name}: {tuple(frames.shape)} -> grid {grid[0].tolist()}, max |ours - transformers| = {diff}")
    assert torch.equal(pv, want), f"max abs diff {diff}"
    # negative controls: the frames in reverse order; a resized video also with bilinear in place of bicubic, and
    # with the resize torchvision does on CUDA (uint8 -> fp32, interpolate, clamp, round) in place of the uint8 kernel
    assert not torch.equal(pixels.preprocess_video(frames[::-1].copy(), cfg)[0], want)
    _, gh, gw = grid[0].tolist()
    if (gh * cfg.patch_size, gw * cfg.patch_size) != frames.shape[1:3]:
        interpolate = torch.nn.functional.interpolate
        controls = {
            "bilinear": lambda x, size, mode, antialias: interpolate(x, size=size, mode="bilinear", antialias=True),
            "fp32": lambda x, size, mode, antialias: interpolate(x.float(), size=size, mode=mode, antialias=True)
            .clamp_(0, 255).round_().to(torch.uint8),
        }
        for control, fn in controls.items():
            monkeypatch.setattr(torch.nn.functional, "interpolate", fn)
            assert not torch.equal(pixels.preprocess_video(frames, cfg)[0], want), control


@pytest.mark.parametrize("name", SAMPLED)
def test_frame_sampling_matches_transformers(name, tmp_path):
    facts, cfg, frames = load(name, tmp_path)
    assert cfg.do_sample_frames and len(frames) == facts["total_num_frames"]
    assert sampled(facts, cfg) == facts["frames_indices"]
    # negative control: the other family's rule (arange from frame 0 vs linspace to the last frame) differs
    assert sampled(facts, cfg, text_timestamps=not cfg.text_timestamps) != facts["frames_indices"]


@pytest.mark.parametrize("name", CASES)
def test_frame_times_match_transformers(name, tmp_path):
    """Qwen2.5-VL: second_per_grid == Qwen2_5_VLProcessor's second_per_grid_ts. Qwen3-VL: frame_timestamps ==
    Qwen3VLProcessor._calculate_timestamps, and the "<t seconds>" blocks they make == replace_video_token's text."""
    facts, cfg, _ = load(name, tmp_path)
    idx, fps, tp = sampled(facts, cfg), facts["video_fps"], cfg.temporal_patch_size
    if not cfg.text_timestamps:
        want = facts["second_per_grid_ts"]
        assert pixels.second_per_grid(len(idx), facts["total_num_frames"], fps, tp) == want
        # negative control: seconds per frame, not per temporal patch
        assert pixels.second_per_grid(len(idx), facts["total_num_frames"], fps, 1) != want
        return
    stamps = pixels.frame_timestamps(idx, fps, tp)
    assert stamps == facts["timestamps"]
    _, gh, gw = REF[f"{name}__video_grid_thw"][0].tolist()
    block = "<|vision_start|>" + "<|video_pad|>" * (gh * gw // cfg.merge_size**2) + "<|vision_end|>"
    assert "".join(f"<{t:.1f} seconds>{block}" for t in stamps) == facts["prompt"]
    # negative control: each pair's first frame's time instead of the pair's mean
    assert [i / fps for i in idx[::tp]] != facts["timestamps"]


def test_fixture_covers_the_cases():
    """Per family: frames at the target size, up- and downscaled, non-square, odd counts, sampled by the processor."""
    for family in ("Qwen2VLVideoProcessor", "Qwen3VLVideoProcessor"):
        kinds, counts = set(), set()
        for name in CASES:
            facts = json.loads(str(REF[f"{name}__facts"]))
            if facts["family"] != family:
                continue
            frames = REF[f"{name}__frames"] if facts["source"] is None else REF[f"source__{facts['source']}"]
            _, gh, gw = REF[f"{name}__video_grid_thw"][0].tolist()
            p = 14 if family.startswith("Qwen2") else 16
            H, W, h, w = *frames.shape[1:3], gh * p, gw * p
            kinds |= {"same" if (h, w) == (H, W) else "down" if h * w < H * W else "up"}
            kinds |= {"nonsquare"} if H != W else set()
            counts.add(len(facts["frames_indices"]))
            kinds |= {"sampled"} if facts["settings"].get("do_sample_frames", family.startswith("Qwen3")) else set()
        assert {"same", "down", "up", "nonsquare", "sampled"} <= kinds, (family, kinds)
        assert {3, 5} <= counts or {3, 7} <= counts, (family, counts)
    assert json.loads(str(REF["versions"]))["transformers"] == "5.23.0"
