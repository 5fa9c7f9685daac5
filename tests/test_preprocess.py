"""Image preprocessing parity: pixels.py against transformers' own image processor (the PIL backend, which is what
AutoImageProcessor returns for a Qwen2.5-VL / Qwen3-VL dir when torchvision is not installed)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from pixels import (CLIP_MEAN, CLIP_STD, FAMILY_DEFAULTS, image_config_from_dir, load_image, num_image_tokens,
                  preprocess_images, save_image_config, smart_resize, to_rgb)


def rand(h, w, c, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def make_images() -> dict[str, Image.Image]:
    """Varied sizes, modes and aspects; (w, h) in PIL's order."""
    ims = {
        "rgb_tiny_5x7": Image.fromarray(rand(7, 5, 3, 0)),  # upscaled to min_pixels
        "rgb_wide_3000x20": Image.fromarray(rand(20, 3000, 3, 1)),  # aspect 150
        "rgb_tall_40x1500": Image.fromarray(rand(1500, 40, 3, 2)),
        "rgb_70x70": Image.fromarray(rand(70, 70, 3, 3)),  # 70/28 = 2.5 rounds down to 2
        "rgb_big_1000x700": Image.fromarray(rand(700, 1000, 3, 4)),  # above the small max_pixels below
        "rgba": Image.fromarray(rand(77, 123, 4, 5), "RGBA"),  # random alpha, 0 and 255 included
        "la": Image.fromarray(rand(60, 90, 2, 6), "LA"),
        "l": Image.fromarray(rand(150, 200, 0, 7)),
        "i16": Image.fromarray(np.random.default_rng(8).integers(0, 65536, (80, 100), dtype=np.uint16)),
        "cmyk": Image.fromarray(rand(48, 64, 4, 9), "CMYK"),
        "bilevel": Image.fromarray(rand(50, 50, 0, 10) > 127),
    }
    drawn = Image.new("RGB", (640, 480), (20, 40, 60))  # smooth areas and hard edges, unlike noise
    d = ImageDraw.Draw(drawn)
    d.ellipse((50, 50, 400, 300), fill=(250, 200, 10))
    d.line((0, 479, 639, 0), fill=(0, 255, 0), width=7)
    d.rectangle((420, 100, 600, 460), outline=(255, 0, 255), width=5)
    ims["rgb_drawn_640x480"] = drawn
    ims["p"] = Image.fromarray(rand(100, 150, 3, 11)).quantize(colors=64)
    p_t = ims["p"].copy()
    p_t.info["transparency"] = 5  # palette index 5 is see-through
    ims["p_transparent"] = p_t
    assert p_t.mode == "P" and (np.array(p_t) == 5).any()
    return ims


CONFIGS = {  # (family defaults, or small bounds so big images shrink and small ones grow cheaply)
    "qwen2.5-vl": dict(patch_size=14),
    "qwen2.5-vl-small": dict(patch_size=14, min_pixels=8 * 28**2, max_pixels=64 * 28**2),
    "qwen3-vl": dict(patch_size=16),
    "qwen3-vl-small": dict(patch_size=16, min_pixels=8 * 32**2, max_pixels=64 * 32**2),
}


def hf_processor(cfg, path):
    """The oracle as a user gets it: AutoImageProcessor on a dir holding the preprocessor_config.json we wrote."""
    save_image_config(cfg, path)
    proc = AutoImageProcessor.from_pretrained(path)
    assert type(proc).__name__ == "Qwen2VLImageProcessorPil"
    return proc


@pytest.mark.parametrize("name", CONFIGS)
def test_pixel_values_match_transformers(name, tmp_path):
    cfg = image_config_from_dir(tmp_path, **CONFIGS[name])  # empty dir: family defaults, then overrides
    named = make_images()
    images = list(named.values())
    assert len(images) >= 12
    ref = hf_processor(cfg, tmp_path)(images=images, return_tensors="pt")
    pv, grid = preprocess_images(images, cfg)
    assert pv.dtype == torch.float32 and grid.dtype == torch.long
    assert torch.equal(grid, ref["image_grid_thw"])
    assert pv.shape == ref["pixel_values"].shape
    diff = (pv - ref["pixel_values"]).abs().max().item()
    print(f"{name}: {pv.shape[0]} rows, max |ours - transformers| = {diff}")
    assert torch.equal(pv, ref["pixel_values"]), f"max abs diff {diff}"
    assert num_image_tokens(grid, cfg.merge_size) == [int(g.prod()) // 4 for g in ref["image_grid_thw"]]
    area = dict(zip(named, (grid[:, 1] * grid[:, 2] * cfg.patch_size**2).tolist()))
    assert area["rgb_tiny_5x7"] >= cfg.min_pixels > 5 * 7  # upscaled
    if "small" in name:  # downscaled; (3000x20 overshoots max_pixels: the short side cannot go below one factor)
        assert area["rgb_big_1000x700"] <= cfg.max_pixels < 1000 * 700


def test_negative_controls(tmp_path):
    """The comparison above must catch a wrong mean/std and a wrong patch or row order."""
    cfg = image_config_from_dir(tmp_path, patch_size=14, min_pixels=8 * 28**2, max_pixels=64 * 28**2)
    img = make_images()["rgb_drawn_640x480"]
    ref = hf_processor(cfg, tmp_path)(images=[img], return_tensors="pt")["pixel_values"]
    pv, grid = preprocess_images([img], cfg)
    assert torch.equal(pv, ref)
    wrong_norm, _ = preprocess_images([img], dataclasses.replace(cfg, image_mean=(0.5,) * 3, image_std=(0.5,) * 3))
    assert not torch.equal(wrong_norm, ref)
    _, gh, gw = grid[0].tolist()
    p, T = cfg.patch_size, cfg.temporal_patch_size
    # rows in raster order instead of 2x2-block order
    raster = pv.view(gh // 2, gw // 2, 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(pv.shape)
    assert not torch.equal(raster, ref)
    # each row (T, C, py, px) instead of (C, T, py, px); or with py and px swapped
    for dims in ((1, 2), (3, 4)):
        swapped = pv.view(-1, 3, T, p, p).transpose(*dims).reshape(pv.shape)
        assert not torch.equal(swapped, ref), dims


def test_to_rgb_matches_transformers_per_mode():
    for name, img in make_images().items():
        ours = np.array(to_rgb(img))
        assert ours.shape[-1] == 3 and ours.dtype == np.uint8, name
        assert np.array_equal(ours, hf_convert_to_rgb(img, return_numpy=True)), name
    # transparency is real: compositing on white differs from dropping alpha
    for name in ("rgba", "la", "p_transparent"):
        img = make_images()[name]
        assert not np.array_equal(np.array(to_rgb(img)), np.array(img.convert("RGB"))), name
    see_through = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (np.array(to_rgb(see_through)) == 255).all()


def test_smart_resize_edges():
    assert smart_resize(70, 280, 28, 4 * 28**2, 16384 * 28**2) == (56, 280)  # 2.5 -> 2 (banker's)
    assert smart_resize(98, 280, 28, 4 * 28**2, 16384 * 28**2) == (112, 280)  # 3.5 -> 4
    assert smart_resize(10, 2000, 28, 3136, 10**9) == hf_smart_resize(10, 2000, 28, 3136, 10**9)  # 200 is allowed
    with pytest.raises(ValueError, match="aspect ratio 201.0"):
        smart_resize(10, 2010, 28, 4 * 28**2, 16384 * 28**2)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_smart_resize(10, 2010, 28, 4 * 28**2, 16384 * 28**2)  # so does transformers
    rng = np.random.default_rng(0)
    for factor, lo, hi in ((28, 3136, 12845056), (32, 65536, 16777216), (28, 8 * 784, 64 * 784)):
        for _ in range(2000):
            h, w = (int(v) for v in rng.integers(1, 5000, 2))
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor)


@pytest.mark.parametrize("size,tokens", [((480, 640), (391, 300)), ((224, 224), (64, 64)),
                                         ((1080, 1920), (2691, 2040))])
def test_num_image_tokens_examples(size, tokens):
    """ARCHITECTURE.md section 6's worked examples, with the released checkpoints' bounds."""
    for patch, want in zip((14, 16), tokens):
        fam = FAMILY_DEFAULTS[patch]
        h, w = smart_resize(*size, 2 * patch, fam["min_pixels"], fam["max_pixels"])
        assert num_image_tokens(torch.tensor([[1, h // patch, w // patch]]), 2) == [want]


def test_image_config_files(tmp_path):
    # a dir without the file: family defaults by patch size, arguments override, no patch size is an error
    cfg = image_config_from_dir(tmp_path, patch_size=16)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.image_mean) == (65536, 16777216, (0.5, 0.5, 0.5))
    assert image_config_from_dir(tmp_path, patch_size=14, max_pixels=1000).max_pixels == 1000
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        image_config_from_dir(tmp_path)
    # round trip through our writer, and transformers reads the same settings
    for patch in (14, 16):
        cfg = image_config_from_dir(tmp_path / "none", patch_size=patch, min_pixels=1234, max_pixels=56789)
        (tmp_path / str(patch)).mkdir()
        proc = hf_processor(cfg, tmp_path / str(patch))
        assert image_config_from_dir(tmp_path / str(patch)) == cfg
        assert (proc.size["shortest_edge"], proc.size["longest_edge"], proc.patch_size) == (1234, 56789, patch)
        assert (tuple(proc.image_mean), tuple(proc.image_std), proc.rescale_factor) == (
            cfg.image_mean, cfg.image_std, cfg.rescale_factor)
    # the two spellings the released checkpoints use (top-level min/max_pixels win over size, as in HF)
    files = {
        "q25": dict(image_processor_type="Qwen2VLImageProcessor", min_pixels=3136, max_pixels=12845056,
                    size={"shortest_edge": 1, "longest_edge": 2}, patch_size=14, temporal_patch_size=2,
                    merge_size=2, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)),
        "q3": dict(image_processor_type="Qwen2VLImageProcessorFast", size={"shortest_edge": 65536,
                   "longest_edge": 16777216}, patch_size=16, temporal_patch_size=2, merge_size=2,
                   image_mean=[0.5] * 3, image_std=[0.5] * 3),
        "sparse": dict(image_processor_type="Qwen2VLImageProcessor"),  # missing keys: HF class defaults
    }
    for name, d in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "preprocessor_config.json").write_text(json.dumps(d))
        cfg, proc = image_config_from_dir(tmp_path / name), AutoImageProcessor.from_pretrained(tmp_path / name)
        assert (cfg.min_pixels, cfg.max_pixels) == (proc.size["shortest_edge"], proc.size["longest_edge"]), name
        assert (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size) == (
            proc.patch_size, proc.merge_size, proc.temporal_patch_size), name
        assert (cfg.image_mean, cfg.image_std) == (tuple(proc.image_mean), tuple(proc.image_std)), name
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "preprocessor_config.json").write_text(json.dumps(dict(do_normalize=False)))
    with pytest.raises(ValueError, match="do_normalize"):
        image_config_from_dir(tmp_path / "bad")


def test_load_image(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="junk.jpg"):
        load_image(tmp_path / "junk.jpg")
    img = make_images()["rgb_drawn_640x480"]
    img.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    assert np.array_equal(np.array(load_image(tmp_path / "full.png")), np.array(img))
    # a palette PNG keeps its transparency through load_image, so to_rgb still composites it on white
    make_images()["p_transparent"].save(tmp_path / "p.png")
    loaded = load_image(tmp_path / "p.png")
    assert loaded.mode == "P" and loaded.info.get("transparency") is not None
    assert np.array_equal(np.array(to_rgb(loaded)), np.array(to_rgb(make_images()["p_transparent"])))
    # EXIF orientation is applied (6 = rotate 90 degrees clockwise to display)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rand(30, 40, 3, 12)).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (30, 40)
