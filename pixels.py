"""Pixels: images to the vision tower's patch rows, and the image settings of a model dir.

A plain-PyTorch copy of transformers' Qwen2VLImageProcessorPil (5.23.0), the processor that Qwen2.5-VL and
Qwen3-VL share; tests/test_preprocess.py checks that it is bit-identical. Used by data.py (training samples),
sample.py and eval.py (prompts) and convert.py (the assembled model keeps its vision donor's settings).

    cfg = image_config_from_dir(model_dir)                 # preprocessor_config.json (or the family's defaults)
    pixel_values, grid_thw = preprocess_images([load_image(path)], cfg)   # (N, C*T*p*p), (n_images, 3)
    num_image_tokens(grid_thw, cfg.merge_size)             # LLM placeholder tokens per image
    image_tokens(height, width, cfg)                       # the same count from the size alone, without pixels
    save_image_config(cfg, out_dir)                        # write preprocessor_config.json
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

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
