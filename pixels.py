"""Pixels: images and videos to the vision tower's patch rows, and the image and video settings of a model dir.

A plain-PyTorch copy of transformers' Qwen2VLImageProcessorPil (5.23.0), the processor that Qwen2.5-VL and
Qwen3-VL share; tests/test_preprocess.py checks that it is bit-identical. Used by data.py (training samples),
sample.py and eval.py (prompts) and convert.py (the assembled model keeps its vision donor's settings).

    cfg = image_config_from_dir(model_dir)                 # preprocessor_config.json (or the family's defaults)
    pixel_values, grid_thw = preprocess_images([load_image(path)], cfg)   # (N, C*T*p*p), (n_images, 3)
    num_image_tokens(grid_thw, cfg.merge_size)             # LLM placeholder tokens per image
    image_tokens(height, width, cfg)                       # the same count from the size alone, without pixels
    save_image_config(cfg, out_dir)                        # write preprocessor_config.json

Videos (the second half of this file), as transformers' two video processors make them (bit-identical on CPU):
    vcfg = video_config_from_dir(model_dir, patch_size)    # video_preprocessor_config.json (or the family's)
    video = load_video("clip.mp4" | "frames/" | [paths], vcfg)   # sampled frames (T, H, W, 3) uint8 + their times
    pixel_values_videos, video_grid_thw = preprocess_video(video.frames, vcfg)
    video_text(video.timestamps(vcfg) if vcfg.text_timestamps else None, pad, start, end)   # its prompt text
"""
import json
import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    patch_size: int  # 14 Qwen2.5-VL, 16 Qwen3-VL
    temporal_patch_size: int = 2
    merge_size: int = 2  # the merger folds merge x merge patches into one LLM token
    min_pixels: int  # bounds on the resized h*w (HF size["shortest_edge"], size["longest_edge"])
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255


# What Qwen2VLImageProcessorPil uses for a key its preprocessor_config.json leaves out (its class attributes).
HF_CLASS_DEFAULTS = dict(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=56 * 56,
                         max_pixels=28 * 28 * 1280, image_mean=CLIP_MEAN, image_std=CLIP_STD, rescale_factor=1 / 255)
# For a model dir with no preprocessor_config.json: the released checkpoints' files (Qwen/Qwen2.5-VL-7B-Instruct,
# Qwen/Qwen3-VL-2B-Instruct; ARCHITECTURE.md section 6), told apart by the vision tower's patch size.
FAMILY_DEFAULTS = {
    14: dict(min_pixels=4 * 28**2, max_pixels=16384 * 28**2, image_mean=CLIP_MEAN, image_std=CLIP_STD),
    16: dict(min_pixels=64 * 32**2, max_pixels=16384 * 32**2, image_mean=(0.5,) * 3, image_std=(0.5,) * 3),
}


def image_config_from_dir(path, patch_size: int | None = None, min_pixels: int | None = None,
                          max_pixels: int | None = None) -> ImageConfig:
    """Image settings of a model dir (its preprocessor_config.json, else the family defaults for `patch_size`);
    arguments that are not None override either."""
    file = Path(path) / "preprocessor_config.json"
    if file.exists():
        d = json.loads(file.read_text())
        # settings this code does not implement: refuse rather than silently differ from transformers
        for key, want in (("do_resize", True), ("do_rescale", True), ("do_normalize", True),
                          ("do_convert_rgb", True), ("resample", 3)):  # 3 = PIL bicubic
            if d.get(key, want) != want:
                raise ValueError(f"{file}: {key}={d[key]!r} is not supported, only {want!r}")
        # HF writes the bounds two ways; as in Qwen2VLImageProcessorPil.__init__, top-level min/max_pixels win
        size = d.get("size") or {}
        d = {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge"), **d}
        kw = {k: v if d.get(k) is None else d[k] for k, v in HF_CLASS_DEFAULTS.items()}
    elif patch_size in FAMILY_DEFAULTS:
        kw = dict(FAMILY_DEFAULTS[patch_size], patch_size=patch_size)
    else:
        raise ValueError(f"{path} has no preprocessor_config.json and patch_size={patch_size} names no family: "
                         f"pass patch_size=14 (Qwen2.5-VL) or 16 (Qwen3-VL)")
    given = dict(patch_size=patch_size, min_pixels=min_pixels, max_pixels=max_pixels)
    kw |= {k: v for k, v in given.items() if v is not None}
    kw["image_mean"], kw["image_std"] = tuple(map(float, kw["image_mean"])), tuple(map(float, kw["image_std"]))
    return ImageConfig(**kw)


def save_image_config(cfg: ImageConfig, path) -> None:
    """Write path/preprocessor_config.json; transformers' AutoImageProcessor reads it back to the same settings."""
    d = dict(image_processor_type="Qwen2VLImageProcessor",  # the PIL backend when torchvision is absent
             do_convert_rgb=True, do_resize=True, resample=3, do_rescale=True, rescale_factor=cfg.rescale_factor,
             do_normalize=True, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
             size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}, patch_size=cfg.patch_size,
             temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size)
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(d, indent=2) + "\n")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) to resize to: multiples of `factor`, h*w within [min_pixels, max_pixels] (a very long, thin image
    can overshoot max_pixels: no side goes below `factor`), aspect kept as well as can be. Same arithmetic as
    transformers: Python's round() is banker's rounding (70/28 = 2.5 -> 2)."""
    if (ratio := max(height, width) / min(height, width)) > 200:
        raise ValueError(f"image of {height}x{width} (h x w) has aspect ratio {ratio:.1f}; the limit is 200: "
                         "crop or pad it")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of `img`, as transformers 5.23 makes it (image_transforms.convert_to_rgb): anything with alpha (an
    A band, or a `transparency` key) is composited on white; every other mode goes through PIL's convert("RGB"),
    which converts CMYK naively (no ICC) and *clips* 16/32-bit greys (I;16, I, F) to 0..255 rather than scaling."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def load_image(path) -> Image.Image:
    """Open and fully decode an image file, upright (EXIF orientation applied, as transformers' load_image does).
    The mode is left as stored: to_rgb, inside preprocess_images, composites any alpha on white."""
    try:
        img = Image.open(path)
        img.load()  # decode now, so a truncated or corrupt file fails here, naming the file
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, ...
        raise ValueError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e
    return ImageOps.exif_transpose(img)


def preprocess_images(images: list[Image.Image], cfg: ImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values (N, C*T*p*p) float32, grid_thw (n_images, 3) long), bit-identical to transformers'
    Qwen2VLImageProcessorPil. Rows of all images are concatenated in order; grid_thw is in patch units."""
    p, m, T = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
    rows, grids = [], []
    for img in images:
        img = to_rgb(img)
        h, w = smart_resize(img.height, img.width, p * m, cfg.min_pixels, cfg.max_pixels)
        img = img.resize((w, h), Image.Resampling.BICUBIC)  # PIL on uint8, called even at the same size, as HF
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (H, W, C) uint8 -> (C, H, W)
        # HF's op order and dtypes: rescale in fp64 then cast to fp32, then (x - mean) / std in fp32
        x = (x.double() * cfg.rescale_factor).float()
        x = (x - mean) / std
        gh, gw = h // p, w // p
        x = x.view(3, gh // m, m, p, gw // m, m, p)
        # (C, gh/m, m, p, gw/m, m, p) -> (gh/m, gw/m, m, m, C, p, p): patches of one merge block are adjacent rows
        x = x.permute(1, 4, 2, 5, 0, 3, 6)
        # a still image is T identical frames: (..., C, p, p) -> (..., C, T, p, p), the Conv3d weight's layout
        x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, T, -1, -1)
        rows.append(x.reshape(gh * gw, 3 * T * p * p))
        grids.append((1, gh, gw))
    if not rows:
        return torch.empty(0, 3 * T * p * p), torch.empty(0, 3, dtype=torch.long)
    return torch.cat(rows), torch.tensor(grids, dtype=torch.long)


def num_image_tokens(grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """LLM placeholder tokens per image: t*h*w patches, merge_size^2 of them per token."""
    return (grid_thw.prod(-1) // merge_size**2).tolist()


def image_tokens(height: int, width: int, cfg: ImageConfig) -> int:
    """LLM tokens of an image of this size, as preprocess_images + num_image_tokens count them, without pixels."""
    h, w = smart_resize(height, width, cfg.patch_size * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)
    return h * w // (cfg.patch_size * cfg.merge_size) ** 2


# ----------------------------------------------------------------------------------------------------------------
# video: frame sampling, resize within a pixel budget, patchify with real temporal frames
#
# A plain-PyTorch copy of transformers' (5.23.0) Qwen2VLVideoProcessor (Qwen2.5-VL) and Qwen3VLVideoProcessor
# (Qwen3-VL), which need torchvision; that does not install beside this CPU torch, so tests/test_video_reference.py
# checks bit-identity against their outputs stored by tests/make_video_reference.py (run in a separate venv): pixels,
# grids, sampled frames, second_per_grid_ts and the "<t seconds>" text, on CPU. The two differ in three ways, all
# keyed on VideoConfig.text_timestamps: how frames are sampled, whether the pixel budget is per frame or per video,
# and whether the prompt writes each frame pair's time as text (Qwen3-VL, "<1.5 seconds>") or the model puts it in
# RoPE (Qwen2.5-VL, second_per_grid_ts).
#
#    cfg = video_config_from_dir(model_dir)
#    idx = sample_frame_indices(total_frames, video_fps, cfg.fps, cfg.min_frames, cfg.max_frames,
#                               cfg.temporal_patch_size, cfg.text_timestamps)
#    pixel_values_videos, video_grid_thw = preprocess_video(frames[idx], cfg)   # (N, C*T*p*p), (1, 3)
#    frame_timestamps(idx, video_fps, cfg.temporal_patch_size)   # Qwen3-VL: one "<t seconds>" per frame pair
#    second_per_grid(len(idx), total_frames, video_fps, cfg.temporal_patch_size)   # Qwen2.5-VL: RoPE time step


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    patch_size: int
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int  # HF size["shortest_edge"], size["longest_edge"]: per frame (Qwen2.5-VL) or per video
    max_pixels: int  # (Qwen3-VL: the bound is on frames * h * w)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    # Qwen3VLVideoProcessor: linspace frame sampling, a per-video pixel budget, timestamps as prompt text.
    # False: Qwen2VLVideoProcessor (Qwen2.5-VL): arange sampling, a per-frame budget, time in M-RoPE.
    text_timestamps: bool
    do_sample_frames: bool  # the processor's own default: Qwen2VL keeps every frame it is given, Qwen3VL samples
    fps: float = 2.0  # Qwen2VLVideoProcessor has none (sampling without one is a TypeError there): qwen-vl-utils' 2
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False  # qwen-vl-utils' per-frame cap; transformers 5.23 leaves it off by default
    max_video_tokens: int = 768  # the cap's budget: Qwen2VL 128000 tokens per video, Qwen3VL 768 per frame


# The video processors' class attributes (what a key left out of the json falls back to), by text_timestamps
VIDEO_CLASS_DEFAULTS = {
    False: dict(patch_size=14, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28, image_mean=CLIP_MEAN,
                image_std=CLIP_STD, do_sample_frames=False, fps=2.0, max_video_tokens=128000),
    True: dict(patch_size=16, min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32, image_mean=(0.5,) * 3,
               image_std=(0.5,) * 3, do_sample_frames=True, fps=2.0, max_video_tokens=768),
}


def video_config_from_dir(path, patch_size: int | None = None) -> VideoConfig:
    """Video settings of a model dir: video_preprocessor_config.json, else preprocessor_config.json (the order
    AutoVideoProcessor looks in), else the class defaults of the family named by `patch_size` (14 Qwen2.5-VL,
    16 Qwen3-VL). The file's video_processor_type names the family; without one, the patch size does."""
    d = {}
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (file := Path(path) / name).exists():
            d = json.loads(file.read_text())
            break
    else:
        if patch_size not in (14, 16):
            raise ValueError(f"{path} has no video_preprocessor_config.json or preprocessor_config.json and "
                             f"patch_size={patch_size} names no family: pass 14 (Qwen2.5-VL) or 16 (Qwen3-VL)")
    kind = d.get("video_processor_type")
    if kind not in (None, "Qwen2VLVideoProcessor", "Qwen3VLVideoProcessor"):
        raise ValueError(f"{path}: video_processor_type {kind!r} is not supported")
    qwen3 = kind == "Qwen3VLVideoProcessor" if kind else (patch_size or d.get("patch_size")) == 16
    # num_frames: a fixed frame count in place of fps sampling, which sample_frame_indices does not do
    for key, want in (("do_resize", True), ("do_rescale", True), ("do_normalize", True), ("resample", 3),
                      ("num_frames", None)):
        if d.get(key, want) != want:
            raise ValueError(f"{path}: {key}={d[key]!r} is not supported, only {want!r}")
    size = d.get("size") or {}
    d = {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge"),
         # Qwen2VL's __init__ lets min_pixels / max_pixels, when given, override size
         **({} if qwen3 else {k: d[k] for k in ("min_pixels", "max_pixels") if d.get(k) is not None}),
         **{k: v for k, v in d.items() if k not in ("min_pixels", "max_pixels")}}
    keys = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor",
            "do_sample_frames", "fps", "min_frames", "max_frames", "cap_pixels_per_frame", "max_video_tokens")
    kw = dict(VIDEO_CLASS_DEFAULTS[qwen3])
    kw |= {k: d[k] for k in ("min_pixels", "max_pixels", *keys) if d.get(k) is not None}
    if patch_size is not None:
        kw["patch_size"] = patch_size
    kw["image_mean"], kw["image_std"] = tuple(map(float, kw["image_mean"])), tuple(map(float, kw["image_std"]))
    return VideoConfig(text_timestamps=qwen3, **kw)


def save_video_config(cfg: VideoConfig, path) -> None:
    """Write path/video_preprocessor_config.json; transformers' AutoVideoProcessor reads it back to the same
    settings (and video_config_from_dir to cfg)."""
    d = dict(video_processor_type="Qwen3VLVideoProcessor" if cfg.text_timestamps else "Qwen2VLVideoProcessor",
             do_convert_rgb=True, do_resize=True, resample=3, do_rescale=True, rescale_factor=cfg.rescale_factor,
             do_normalize=True, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
             size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}, patch_size=cfg.patch_size,
             temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
             do_sample_frames=cfg.do_sample_frames, fps=cfg.fps, min_frames=cfg.min_frames, max_frames=cfg.max_frames)
    (Path(path) / "video_preprocessor_config.json").write_text(json.dumps(d, indent=2) + "\n")


def sample_frame_indices(total_frames: int, video_fps: float, fps: float = 2.0, min_frames: int = 4,
                         max_frames: int = 768, temporal_patch_size: int = 2, text_timestamps: bool = False) -> list[int]:
    """Which of a video's frames the processor keeps, sampling `fps` a second (sample_frames of the two classes).

    Qwen2VL: n = a multiple of temporal_patch_size within [min_frames, max_frames], floored, evenly spaced from
    frame 0 (arange with a float step, truncated). Qwen3VL (text_timestamps): n = int(duration * fps) within
    [min_frames, max_frames], first and last frame included (linspace, rounded); the patchifier then repeats the
    last frame up to a multiple of temporal_patch_size."""
    if text_timestamps:
        n = min(max(int(total_frames / video_fps * fps), min_frames), max_frames, total_frames)
        return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()
    max_frames = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
    n = min(max(total_frames / video_fps * fps, min_frames), max_frames, total_frames)
    n = math.floor(n / temporal_patch_size) * temporal_patch_size
    if n <= 0:
        raise ValueError(f"a video of {total_frames} frames is shorter than temporal_patch_size={temporal_patch_size}")
    return torch.arange(0, total_frames, total_frames / n).int().tolist()


def frame_timestamps(indices: list[int], video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Qwen3-VL: the time (s) of each frame pair, written "<{t:.1f} seconds>" before its block in the prompt:
    the mean of its first and last frame's idx / fps, the last index repeated to fill a pair (the processor's
    _calculate_timestamps)."""
    indices = list(indices) + [indices[-1]] * (-len(indices) % temporal_patch_size)
    t = [i / video_fps for i in indices]
    return [(t[i] + t[i + temporal_patch_size - 1]) / 2 for i in range(0, len(t), temporal_patch_size)]


def second_per_grid(n_sampled: int, total_frames: int, video_fps: float, temporal_patch_size: int = 2) -> float:
    """Qwen2.5-VL: seconds one temporal patch spans, temporal_patch_size / the sampled fps (the processor's
    second_per_grid_ts entry for this video)."""
    return temporal_patch_size / (n_sampled / total_frames * video_fps)


def video_resize(num_frames: int, height: int, width: int, cfg: VideoConfig) -> tuple[int, int]:
    """(h, w) every frame is resized to. Qwen2VL: smart_resize per frame. Qwen3VL: its own smart_resize, which
    bounds frames * h * w (frames rounded to temporal pairs) and first scales up a side below the factor."""
    factor, max_pixels = cfg.patch_size * cfg.merge_size, cfg.max_pixels
    if not cfg.text_timestamps:
        if cfg.cap_pixels_per_frame:  # an even share of 90% of max_video_tokens' pixels, per temporal pair
            total = int(cfg.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total * cfg.temporal_patch_size // num_frames), int(cfg.min_pixels * 1.05))
        return smart_resize(height, width, factor, cfg.min_pixels, max_pixels)
    if cfg.cap_pixels_per_frame:
        per_frame = max(min(cfg.max_video_tokens * factor * factor, max_pixels // num_frames), int(cfg.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    tf = cfg.temporal_patch_size
    if num_frames < tf:
        raise ValueError(f"a video of {num_frames} frames has fewer than temporal_patch_size={tf}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if (ratio := max(height, width) / min(height, width)) > 200:
        raise ValueError(f"video of {height}x{width} (h x w) has aspect ratio {ratio:.1f}; the limit is 200")
    h, w, t = round(height / factor) * factor, round(width / factor) * factor, round(num_frames / tf) * tf
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (num_frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_video(frames, cfg: VideoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One video's (already sampled) frames, a list of PIL images or a (T, H, W, 3) uint8 array ->
    (pixel_values_videos (N, C*T*p*p) float32, video_grid_thw (1, 3) long), as the video processor makes them.

    The resize is the processor's torchvision resize, bicubic with antialias on uint8 frames. On a CPU tensor
    torchvision calls torch's native uint8 kernel, F.interpolate below, which rounds to uint8 between its two
    separable passes; on CUDA torchvision goes uint8 -> fp32 -> clamp -> round instead: 1 level off on smooth
    downscales, up to ~20 on noise or upscales. tests/test_video_reference.py checks this function bit-identical
    to both processors on CPU (stored outputs of transformers 5.23.0 / torchvision 0.29.1), the CUDA path not.
    """
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"video frames must be a (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(frames))
    else:
        x = torch.stack([torch.from_numpy(np.array(to_rgb(f))) for f in frames])
    x = x.permute(0, 3, 1, 2).contiguous()  # (T, H, W, C) -> (T, C, H, W) uint8
    T, _, H, W = x.shape
    h, w = video_resize(T, H, W, cfg)
    if (h, w) != (H, W):  # torchvision returns the frames untouched at the same size
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True)
    # the processor's fused rescale + normalise: (x - mean / scale) / (std / scale) in fp32
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    x = (x.float() - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if pad := -T % tp:  # the last frame repeated up to a whole temporal patch
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    x = x.view(gt, tp, 3, gh // m, m, p, gw // m, m, p)
    # (gt, tp, C, gh/m, m, p, gw/m, m, p) -> (gt, gh/m, gw/m, m, m, C, tp, p, p): preprocess_images' row layout,
    # with real frames where an image repeats one
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, 3 * tp * p * p), torch.tensor([[gt, gh, gw]])


def video_tokens(num_frames: int, height: int, width: int, cfg: VideoConfig) -> int:
    """LLM tokens of a video of num_frames (sampled) frames of this size, as preprocess_video + the merger count
    them (get_num_of_video_patches // merge_size^2); the prompt's timestamp and vision_start/end tokens aside."""
    h, w = video_resize(num_frames, height, width, cfg)
    return -(-num_frames // cfg.temporal_patch_size) * h * w // (cfg.patch_size * cfg.merge_size) ** 2


# ---- reading videos: a file (decoded by PyAV), a folder of frames or a list of frame images ----

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # what a folder of frames holds


@dataclass(frozen=True)
class Video:
    """A video's sampled frames and where they sit in its source: what the processor and the prompt need."""
    frames: np.ndarray  # (T, H, W, 3) uint8
    indices: list[int]  # of the source's frames
    fps: float  # the source's frame rate (a list of frames: the rate it was taken at)
    total_frames: int  # in the source

    def timestamps(self, cfg: VideoConfig) -> list[float]:  # Qwen3-VL's "<t seconds>", one per frame pair
        return frame_timestamps(self.indices, self.fps, cfg.temporal_patch_size)

    def second_per_grid(self, cfg: VideoConfig) -> float:  # Qwen2.5-VL's second_per_grid_ts entry
        return second_per_grid(len(self.indices), self.total_frames, self.fps, cfg.temporal_patch_size)


def frame_paths(source) -> list[Path] | None:
    """The frame images of a video given as frames (a list of paths, or a folder of images in name order), or
    None for a video file."""
    if isinstance(source, (list, tuple)):
        return [Path(f) for f in source]
    if not str(source):  # Path("") is the working directory: a folder of frames nobody meant
        raise FileNotFoundError("no video path given")
    if Path(source).is_dir():
        return sorted(f for f in Path(source).iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
    return None


def video_indices(total_frames: int, fps: float, cfg: VideoConfig, frames_given: bool = False) -> list[int]:
    """The source frames a video keeps. A file is sampled as the processor samples it (sample_frame_indices, at
    cfg.fps within cfg.min_frames..max_frames); frames given as images are taken as already sampled (as
    qwen-vl-utils and the processors do), all of them, evenly thinned only beyond cfg.max_frames."""
    if total_frames <= 0:
        raise ValueError("the video has no frames")
    if cfg.max_frames < cfg.temporal_patch_size:
        raise ValueError(f"max_frames {cfg.max_frames} is fewer than a temporal patch ({cfg.temporal_patch_size} frames)")
    if frames_given:
        n = min(total_frames, cfg.max_frames)
        return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()
    return sample_frame_indices(total_frames, fps, cfg.fps, cfg.min_frames, cfg.max_frames, cfg.temporal_patch_size,
                                cfg.text_timestamps)


def video_header(path) -> tuple[int, float]:
    """(frames, frame rate) of a video file from its container, as transformers' PyAV reader takes them
    (stream.frames, average_rate); a container that does not store the count is counted by demuxing."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ValueError(f"{path}: the video stream has no frame rate")
        total = stream.frames or sum(p.size > 0 for p in container.demux(stream))
        return total, float(rate)


def open_video(path):
    """av.open with the file named in every error (missing, not a video, no video stream)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise ValueError(f"cannot open video file {path}: {e}") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} has no video stream")
    return container


def load_video(source, cfg: VideoConfig, fps: float | None = None) -> Video:
    """Decode and sample a video: a file (any container and codec FFmpeg reads, through PyAV), a folder of frame
    images, or a list of them (taken at `fps` frames a second, default cfg.fps). Frames are RGB uint8 as PyAV's
    rgb24 conversion gives them (transformers' PyAV backend does the same); a frame that does not decode, or a
    file shorter than its header says, raises naming the file."""
    if (paths := frame_paths(source)) is not None:
        if not paths:
            raise ValueError(f"{source}: a folder of frames with no {'/'.join(FRAME_SUFFIXES)} images")
        rate = fps or cfg.fps
        idx = video_indices(len(paths), rate, cfg, frames_given=True)
        frames = [np.array(to_rgb(load_image(paths[i]))) for i in idx]
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"{source}: frames of different sizes {sorted({f.shape[:2] for f in frames})}")
        return Video(np.stack(frames), idx, rate, len(paths))
    container = open_video(source)
    with container:
        total, rate = video_header(source)
        idx = video_indices(total, rate, cfg)
        want, frames, stream = set(idx), [], container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-threaded decode: on 2 cores about 1.5x faster
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if i >= idx[-1]:
                    break
        except av.FFmpegError as e:
            raise ValueError(f"{source}: frame {len(frames)} of the sampled {len(idx)} does not decode: {e}") from e
    if len(frames) < len(idx):
        raise ValueError(f"{source}: {total} frames in its header, fewer decode (the file is truncated?)")
    return Video(np.stack(frames), idx, rate, total)


def video_text(timestamps: list[float] | None, pad: str, start: str, end: str) -> str:
    """What one video placeholder becomes in the prompt, each block's pads as ONE pad (expanded to its count by the
    caller, as image pads are): Qwen2.5-VL start + pad + end, one block of all the video's tokens; Qwen3-VL start,
    then per frame pair "<t seconds>" + start + pad + end, then end (Qwen3VLProcessor.replace_video_token, 5.23:
    the per-frame blocks sit inside the chat template's own vision_start/end)."""
    if timestamps is None:
        return start + pad + end
    return start + "".join(f"<{t:.1f} seconds>{start}{pad}{end}" for t in timestamps) + end


def video_blocks(num_frames: int, height: int, width: int, cfg: VideoConfig) -> list[int]:
    """Pads of each block of a video of num_frames sampled frames: one block of all its tokens (Qwen2.5-VL), or
    one block of one frame pair's tokens per pair (Qwen3-VL, whose prompt puts a timestamp before each)."""
    n = video_tokens(num_frames, height, width, cfg)
    t = -(-num_frames // cfg.temporal_patch_size)
    return [n // t] * t if cfg.text_timestamps else [n]


# ---- the dataset check's image and video facts, decoded once and cached beside the data ----


def image_facts(path: Path) -> list:
    """[file size, mtime_ns, height, width, problem] of an image after a full decode (problem "" when it is fine):
    what the dataset check needs, cached by size and mtime so that a restart decodes nothing again."""
    try:
        st = path.stat()
    except OSError:
        return [-1, -1, 0, 0, "missing image"]
    try:
        img = load_image(path)
        return [st.st_size, st.st_mtime_ns, img.height, img.width, ""]
    except (ValueError, FileNotFoundError) as e:  # corrupt, truncated, not an image
        return [st.st_size, st.st_mtime_ns, 0, 0, f"undecodable image: {e}"]


def video_facts(path: Path) -> list:
    """[file size, mtime_ns, frames, frame rate, height, width, problem] of a video file after decoding every
    frame (problem "" when it is fine), as image_facts is for an image: the header's frame count, which
    load_video samples from, and a problem if fewer frames decode."""
    try:
        st = path.stat()
    except OSError:
        return [-1, -1, 0, 0.0, 0, 0, "missing video"]
    decoded, h, w = 0, 0, 0
    try:
        with open_video(path) as container:
            total, rate = video_header(path)
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                decoded, h, w = decoded + 1, frame.height, frame.width
    except av.FFmpegError as e:  # a corrupt frame (PyAV's errors are ValueErrors too: this one first)
        return [st.st_size, st.st_mtime_ns, 0, 0.0, 0, 0, f"undecodable video: {path}: frame {decoded}: {e}"]
    except (ValueError, FileNotFoundError) as e:  # not a video, no video stream (open_video names the file)
        return [st.st_size, st.st_mtime_ns, 0, 0.0, 0, 0, f"undecodable video: {e}"]
    if decoded < total:
        return [st.st_size, st.st_mtime_ns, 0, 0.0, 0, 0,
                f"undecodable video: {path}: {total} frames in its header, {decoded} decode (truncated?)"]
    return [st.st_size, st.st_mtime_ns, total, rate, h, w, ""]


def check_files(paths: dict[str, Path], num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 gather=None, facts_of=image_facts) -> dict[str, list]:
    """facts_of (image_facts, or video_facts) every file in `paths` (file -> its cache file, beside its dataset),
    from the caches where size and mtime still match; the rest decoded, each rank its share (in `num_workers`
    processes), gathered (gather: one rank's results -> every rank's), and the caches updated by rank 0."""
    caches = {}
    for f in set(paths.values()):
        try:
            caches[f] = json.loads(f.read_text()) if f.is_file() else {}
        except ValueError:  # a damaged cache is only a slower start
            caches[f] = {}
    facts = {}
    for p, f in paths.items():
        hit = caches[f].get(p)
        try:
            st = Path(p).stat()
            if hit and hit[:2] == [st.st_size, st.st_mtime_ns]:
                facts[p] = hit
        except OSError:
            pass
    todo = sorted(set(paths) - set(facts))[rank::world_size]
    if num_workers > 0 and len(todo) > 64:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            new = dict(zip(todo, pool.map(facts_of, map(Path, todo), chunksize=64)))
    else:
        new = {p: facts_of(Path(p)) for p in todo}
    for shard in gather(new) if world_size > 1 else [new]:
        facts |= shard
        if rank == 0:
            for p, fact in shard.items():
                caches[paths[p]][p] = fact
    if rank == 0:
        for f, cache in caches.items():
            try:
                tmp = f.with_name(f.name + ".tmp")
                tmp.write_text(json.dumps(cache))
                tmp.replace(f)
            except OSError:  # a read-only dataset: no cache, the next start decodes again
                pass
    return facts
