"""Writes tests/data/video_reference.npz: transformers' own video processors (Qwen2VLVideoProcessor for
Qwen2.5-VL, Qwen3VLVideoProcessor for Qwen3-VL) run on small fixed frame stacks, for tests/test_video_reference.py.

Those processors need torchvision, which does not install beside the project's torch, so this runs in a separate
venv (CPU; the CUDA wheels run on CPU too):

    python3 -m venv /work/oracle
    /work/oracle/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.23.0 numpy pillow av
    /work/oracle/bin/python tests/make_video_reference.py

Each processor is built from its class defaults plus a case's few settings, saved with save_pretrained and read
back with AutoVideoProcessor (the file a user's model dir holds; the test reads the same JSON with
pixels.video_config_from_dir), then called on the frames with VideoMetadata, through the model processor's own
_process_videos (on a stub: the real one needs a tokenizer) so that second_per_grid_ts (Qwen2_5_VLProcessor) and
the "<t seconds>" prompt text (Qwen3VLProcessor) are the processors' too.
"""
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
import transformers
from transformers import AutoVideoProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers import Qwen2VLVideoProcessor, Qwen3VLVideoProcessor

OUT = Path(__file__).resolve().parent / "data" / "video_reference.npz"
F2, F3 = 28 * 28, 32 * 32  # one merged token's pixels: patch 14 x merge 2, patch 16 x merge 2


def smooth(seed: int, t: int, h: int, w: int) -> np.ndarray:
    """(t, h, w, 3) uint8: drifting sinusoids (saturating at 0 and 255) and a moving hard-edged box; smooth
    areas and sharp edges tell resize kernels apart better than noise alone (and compress far better)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w] / max(h, w)
    out = np.empty((t, h, w, 3))
    for c in range(3):
        fy, fx, phase, speed = rng.uniform(-6, 6), rng.uniform(-6, 6), rng.uniform(0, 6), rng.uniform(0.3, 1)
        for i in range(t):
            out[i, ..., c] = 128 + 150 * np.sin(fy * y + fx * x + phase + speed * i)
    for i in range(t):
        y0, x0 = (i * 3) % max(1, h // 2), (i * 5) % max(1, w // 2)
        out[i, y0:y0 + h // 3 + 1, x0:x0 + w // 3 + 1] = rng.uniform(0, 255, 3)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def noise(seed: int, t: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def pan(seed: int, t: int, h: int, w: int) -> np.ndarray:
    """A camera pan over one still: frame i is columns i..i+w; every frame differs, and the file stays small."""
    still = smooth(seed, 1, h, w + t)[0]
    return np.stack([still[:, i:i + w] for i in range(t)])


# Frames that several cases share: a source video that the sampling cases cut frames from (100 frames at 25 fps,
# 4 s), and two wide clips that are resized with and without the per-frame cap
SOURCES = {"pan100": pan(100, 100, 24, 40), "wide50x100": smooth(2, 2, 50, 100), "wide60x110": smooth(12, 2, 60, 110)}
SOURCE_FPS = 25.0

# name: (processor class, frames or a source name, settings saved in the config, the call's VideoMetadata).
# Frames not sampled by the processor stand for frames a caller sampled: metadata frames_indices says which.
Q2, Q3 = Qwen2VLVideoProcessor, Qwen3VLVideoProcessor


def given(n, step=7, fps=24.0):
    return dict(total_num_frames=step * n + 3, fps=fps, frames_indices=list(range(0, step * n, step)))


CASES = {
    # Qwen2.5-VL: the bounds are on each frame's h * w
    "q2_at_size_3f": (Q2, smooth(1, 3, 28, 28), dict(size=dict(shortest_edge=F2, longest_edge=4 * F2)), given(3)),
    "q2_down_2f": (Q2, ("wide50x100", 2), dict(size=dict(shortest_edge=2 * F2, longest_edge=4 * F2)), given(2)),
    "q2_up_3f": (Q2, smooth(3, 3, 12, 24), dict(size=dict(shortest_edge=1200, longest_edge=4 * F2)), given(3)),
    "q2_nonsquare_5f": (Q2, smooth(4, 5, 45, 20), dict(size=dict(shortest_edge=2 * F2, longest_edge=4 * F2)),
                        given(5)),
    "q2_noise_7f": (Q2, noise(5, 7, 30, 35), dict(size=dict(shortest_edge=F2, longest_edge=4 * F2)), given(7, 3)),
    "q2_cap_2f": (Q2, ("wide50x100", 2), dict(size=dict(shortest_edge=F2, longest_edge=4 * F2),
                                                 cap_pixels_per_frame=True, max_video_tokens=2), given(2)),
    # frames sampled by the processor from the source: 2 fps of 4 s; max_frames; min_frames over 0.8 s.
    # (Qwen2VLVideoProcessor has no fps of its own: do_sample_frames without one is a TypeError in 5.23.)
    "q2_sample_fps2": (Q2, ("pan100", 100), dict(size=dict(shortest_edge=F2, longest_edge=4 * F2),
                                                 do_sample_frames=True, fps=2), {}),
    "q2_sample_max_frames": (Q2, ("pan100", 100), dict(size=dict(shortest_edge=F2, longest_edge=4 * F2),
                                                       do_sample_frames=True, fps=2, max_frames=5), {}),
    "q2_sample_min_frames": (Q2, ("pan100", 20), dict(size=dict(shortest_edge=F2, longest_edge=4 * F2),
                                                      do_sample_frames=True, fps=2, min_frames=4), {}),
    # Qwen3-VL: the bounds are on frames * h * w (frames rounded to pairs)
    "q3_at_size_3f": (Q3, smooth(11, 3, 32, 32), dict(size=dict(shortest_edge=2 * F3, longest_edge=8 * F3),
                                                    do_sample_frames=False), given(3)),
    "q3_down_2f": (Q3, ("wide60x110", 2), dict(size=dict(shortest_edge=2 * F3, longest_edge=8 * F3),
                                                  do_sample_frames=False), given(2)),
    "q3_up_small_3f": (Q3, smooth(13, 3, 10, 10), dict(size=dict(shortest_edge=2 * F3, longest_edge=8 * F3),
                                                     do_sample_frames=False), given(3)),  # a side < 32 first
    "q3_up_min_2f": (Q3, smooth(14, 2, 30, 45), dict(size=dict(shortest_edge=2600, longest_edge=8 * F3),
                                                   do_sample_frames=False), given(2)),  # below min_pixels
    "q3_nonsquare_2f": (Q3, smooth(15, 2, 50, 34), dict(size=dict(shortest_edge=2 * F3, longest_edge=8 * F3),
                                                      do_sample_frames=False), given(2)),
    "q3_noise_7f": (Q3, noise(16, 7, 40, 36), dict(size=dict(shortest_edge=2 * F3, longest_edge=8 * F3),
                                                 do_sample_frames=False), given(7, 3)),
    "q3_cap_2f": (Q3, ("wide60x110", 2), dict(size=dict(shortest_edge=F3, longest_edge=8 * F3),
                                                 do_sample_frames=False, cap_pixels_per_frame=True,
                                                 max_video_tokens=1), given(2)),
    "q3_sample_fps2": (Q3, ("pan100", 100), dict(size=dict(shortest_edge=2 * F3, longest_edge=8 * F3)), {}),
    "q3_sample_max_frames": (Q3, ("pan100", 100), dict(size=dict(shortest_edge=2 * F3, longest_edge=8 * F3),
                                                       max_frames=5), {}),
    "q3_sample_min_frames": (Q3, ("pan100", 20), dict(size=dict(shortest_edge=2 * F3, longest_edge=8 * F3),
                                                      min_frames=4), {}),
}


def processor_stub(video_processor):
    """Qwen2_5_VLProcessor / Qwen3VLProcessor without __init__ (which wants a tokenizer): their _process_videos
    and replace_video_token need only the video processor and the token strings."""
    cls = Qwen3VLProcessor if isinstance(video_processor, Q3) else Qwen2_5_VLProcessor
    proc = object.__new__(cls)
    proc.video_processor = video_processor
    proc.video_token = "<|video_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    return proc


def run_case(cls, frames, settings, metadata):
    with tempfile.TemporaryDirectory() as d:
        cls(**settings).save_pretrained(d)
        config_json = (Path(d) / "video_preprocessor_config.json").read_text()
        vp = AutoVideoProcessor.from_pretrained(d)
    assert type(vp) is cls, type(vp)
    if vp.do_sample_frames:  # the processor samples the source itself
        metadata = dict(total_num_frames=len(frames), fps=SOURCE_FPS)
    out = vp(frames, video_metadata=copy.deepcopy(metadata), return_metadata=True, return_tensors="pt")
    md = out["video_metadata"][0]
    idx = np.asarray(md.frames_indices).tolist()
    facts = dict(config_json=config_json, total_num_frames=md.total_num_frames, video_fps=md.fps, frames_indices=idx)
    # again through the model processor, for what it adds (a fresh copy of the metadata: Qwen3VLProcessor's
    # replace_video_token extends a list frames_indices in place with the padding frame)
    full, prompts = processor_stub(vp)._process_videos(frames, video_metadata=copy.deepcopy(metadata),
                                                       return_metadata=True, return_tensors="pt")
    assert torch.equal(full["pixel_values_videos"], out["pixel_values_videos"])
    if cls is Q2:
        facts["second_per_grid_ts"] = full["second_per_grid_ts"][0]
    else:
        facts["timestamps"] = processor_stub(vp)._calculate_timestamps(list(idx), md.fps, vp.temporal_patch_size)
        facts["prompt"] = prompts[0]
    return out["pixel_values_videos"], out["video_grid_thw"], facts


def main():
    arrays = {f"source__{k}": v for k, v in SOURCES.items()}
    for name, (cls, frames, settings, metadata) in CASES.items():
        if isinstance(frames, tuple):  # (source, its first n frames)
            source, n = frames
            frames = SOURCES[source][:n]
            where = dict(source=source, first=n)
        else:
            arrays[f"{name}__frames"] = frames
            where = dict(source=None)
        pv, grid, facts = run_case(cls, frames, settings, metadata)
        assert pv.dtype == torch.float32 and grid.shape == (1, 3)
        arrays[f"{name}__pixel_values_videos"] = pv.numpy()
        arrays[f"{name}__video_grid_thw"] = grid.numpy()
        arrays[f"{name}__facts"] = np.array(json.dumps(dict(facts, family=cls.__name__, settings=settings, **where)))
        print(f"{name}: {cls.__name__} frames {tuple(frames.shape)} -> grid {grid[0].tolist()}, "
              f"frames {facts['frames_indices']}")
    arrays["versions"] = np.array(json.dumps(dict(transformers=transformers.__version__, torch=torch.__version__,
                                                  torchvision=torchvision.__version__, numpy=np.__version__,
                                                  cpu=torch.backends.cpu.get_cpu_capability(),
                                                  python=sys.version.split()[0])))
    arrays["cases"] = np.array(list(CASES))
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
