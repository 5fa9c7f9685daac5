"""The vision tower on a batch of images, ours vs transformers on the same weights, in one process, CPU, fp32,
no flash-attn: seconds per image at batch 1 and at --batch, and the features' max difference.

    python bench/vision_speed.py [--batch 8] [--size 448] [--depth 8] [--repeats 3] [--threads N]

Towers at the real widths with fewer blocks (--depth): Qwen2.5-VL-7B's (hidden 1280, 16 heads, SwiGLU 3420,
112-pixel windows, full attention every 4th block) and Qwen3-VL-2B's (hidden 1024, 16 heads, GELU 4096, patch 16,
deepstack). A batch is what eval.py sends at --batch-size 8: the images in one call, attention kept inside each
image (and each window). Without flash-attn, we run the images' segments of one length as one SDPA batch (cost
sum of L^2); an (N, N) block-diagonal mask would cost N^2, 8x more at 8 equal images.

Measured on the project's 2-core EPYC, quiet, defaults (8 blocks, 448x448, best of 3), seconds per image:
    qwen2_5_vl  batch 1: 1.905 vs 2.025 (1.06x)   batch 8: 2.392 vs 2.391 (1.00x)   max |diff| 1.1e-05
    qwen3_vl    batch 1: 1.178 vs 1.204 (1.02x)   batch 8: 1.195 vs 1.283 (1.07x)   max |diff| 6.0e-06
With the earlier block-diagonal mask, qwen2_5_vl at batch 8 took 11.03 s/image (0.20x transformers).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
from vision import VisionTower  # noqa: E402

TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, bos_token_id=1, eos_token_id=2)


def towers(family: str, depth: int):
    """(transformers' tower, ours with its weights, patch size)."""
    import transformers

    if family == "qwen2_5_vl":
        full = list(range(depth // 4 - 1, depth, depth // 4))  # 7B: [7, 15, 23, 31] of 32
        vision = dict(depth=depth, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                      patch_size=14, window_size=112, fullatt_block_indexes=full)
        cfg = transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=depth, hidden_size=1024, num_heads=16, intermediate_size=4096, out_hidden_size=2048,
                      patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[1, depth // 2, depth - 1])
        cfg = transformers.Qwen3VLConfig(text_config=dict(TEXT, head_dim=16), vision_config=vision)
        cls = transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    hf = cls(cfg).model.visual.eval()
    ours = VisionTower(M.vision_config_from_hf(cfg.vision_config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours, vision["patch_size"]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=448, help="image side in pixels")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} threads, fp32, {args.size}x{args.size} images, depth {args.depth}, "
          f"best of {args.repeats}")
    for family in ("qwen2_5_vl", "qwen3_vl"):
        hf, ours, patch = towers(family, args.depth)
        side = args.size // patch // 2 * 2
        row = 3 * 2 * patch * patch
        print(f"{family}: {side}x{side} patches per image")
        for n in (1, args.batch):
            grid = torch.tensor([[1, side, side]] * n)
            pv = torch.randn(n * side * side, row, generator=torch.Generator().manual_seed(n))
            diff = (ours(pv, grid)[0] - hf(pv, grid_thw=grid).pooler_output).abs().max().item()
            t_ours = best_time(lambda: ours(pv, grid), args.repeats)
            t_hf = best_time(lambda: hf(pv, grid_thw=grid), args.repeats)
            print(f"  batch {n}: ours {t_ours / n:6.3f} s/image, transformers {t_hf / n:6.3f} s/image = "
                  f"{t_hf / t_ours:.2f}x; max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
