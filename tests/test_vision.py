"""Vision towers and mergers against tiny random transformers models (the oracle), CPU, fp32."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when not pip-installed

import vision  # noqa: E402
from merger import MergerConfig, PatchMerger  # noqa: E402
from model import vision_config_from_hf  # noqa: E402
from vision import VisionConfig, VisionTower  # noqa: E402

transformers = pytest.importorskip("transformers")

# Patch units, h and w multiples of the merge size. Non-square, a grid that is not a multiple of the
# Qwen2.5-VL window (2x2 merged tokens here), one that is, and a 2-frame video.
GRIDS = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 6, 10], [2, 4, 4]])
TEXT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=256)
TOL = 1e-4


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight at O(1) scale: transformers' std-0.02 init makes attention nearly uniform and
    activations tiny, which would let a wrong mask or a swapped block pass a 1e-4 tolerance."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name or "ln_q" in name:  # norm1/norm2, merger norm / ln_q
            p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
        elif p.dim() >= 2 and "pos_embed" not in name:
            p.copy_(noise / p[0].numel() ** 0.5)  # fan-in scaling keeps every Linear's output O(1)
        else:
            p.copy_(noise * (1.0 if "pos_embed" in name else 0.1))


def qwen25_visual():
    torch.manual_seed(0)
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=TEXT,
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=48,
                           patch_size=14, window_size=56, fullatt_block_indexes=[1, 3]))  # windows: 2x2 merged
    visual = transformers.Qwen2_5_VLForConditionalGeneration(cfg).model.visual.eval()
    randomize_(visual, seed=1)
    return cfg.vision_config, visual


def qwen3_visual():
    torch.manual_seed(0)
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(TEXT, head_dim=24),
        vision_config=dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48,
                           patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 2]))
    visual = transformers.Qwen3VLForConditionalGeneration(cfg).model.visual.eval()
    randomize_(visual, seed=2)
    return cfg.vision_config, visual


def ours_from(hf_cfg, visual, **override) -> VisionTower:
    cfg = dataclasses.replace(vision_config_from_hf(hf_cfg.to_dict()), **override)
    tower = VisionTower(cfg).eval()
    tower.load_state_dict(visual.state_dict(), strict=True)
    return tower


def pixels(hf_cfg, grids=GRIDS, seed=3) -> torch.Tensor:
    row = hf_cfg.in_channels * hf_cfg.temporal_patch_size * hf_cfg.patch_size**2
    return torch.randn(int(grids.prod(-1).sum()), row, generator=torch.Generator().manual_seed(seed))


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_qwen25_parity_and_controls():
    hf_cfg, visual = qwen25_visual()
    ours, pv = ours_from(hf_cfg, visual), pixels(hf_cfg)
    ref = visual(pv, grid_thw=GRIDS).pooler_output
    out, deepstack = ours(pv, GRIDS)
    assert out.shape == (int(GRIDS.prod(-1).sum()) // 4, 48) and deepstack == []
    assert maxdiff(out, ref) < TOL, maxdiff(out, ref)
    assert ref.abs().max() > 0.5  # the features are O(1), so 1e-4 is a tight bound

    # Negative controls: each must move the output far outside the tolerance.
    no_windows = ours_from(hf_cfg, visual, window_size=0)                    # every block full attention
    assert maxdiff(no_windows(pv, GRIDS)[0], ref) > 1e-2
    swapped = ours_from(hf_cfg, visual)                                      # window block 0 <-> full block 1
    swapped.blocks[0], swapped.blocks[1] = swapped.blocks[1], swapped.blocks[0]
    assert maxdiff(swapped(pv, GRIDS)[0], ref) > 1e-2


@torch.no_grad()
def test_qwen3_parity_and_controls():
    hf_cfg, visual = qwen3_visual()
    ours, pv = ours_from(hf_cfg, visual), pixels(hf_cfg)
    ref = visual(pv, grid_thw=GRIDS)
    out, deepstack = ours(pv, GRIDS)
    assert maxdiff(out, ref.pooler_output) < TOL, maxdiff(out, ref.pooler_output)
    assert len(deepstack) == len(ref.deepstack_features) == 2
    for ours_d, ref_d in zip(deepstack, ref.deepstack_features):
        assert maxdiff(ours_d, ref_d) < TOL, maxdiff(ours_d, ref_d)
    assert ref.pooler_output.abs().max() > 0.5

    swapped = ours_from(hf_cfg, visual)
    swapped.blocks[0], swapped.blocks[1] = swapped.blocks[1], swapped.blocks[0]
    assert maxdiff(swapped(pv, GRIDS)[0], ref.pooler_output) > 1e-2
    transposed = ours_from(hf_cfg, visual)                                   # pos-embed rows <-> columns
    table = transposed.pos_embed.weight.data
    table.copy_(table.view(8, 8, -1).transpose(0, 1).reshape(64, -1))
    assert maxdiff(transposed(pv, GRIDS)[0], ref.pooler_output) > 1e-2
    ds_swapped = ours_from(hf_cfg, visual)
    ds_swapped.deepstack_merger_list = torch.nn.ModuleList(reversed(ds_swapped.deepstack_merger_list))
    assert maxdiff(ds_swapped(pv, GRIDS)[1][0], ref.deepstack_features[0]) > 1e-2


@pytest.mark.parametrize("make", [qwen25_visual, qwen3_visual])
@torch.no_grad()
def test_one_call_equals_separate_calls(make, monkeypatch):
    hf_cfg, visual = make()
    ours, pv = ours_from(hf_cfg, visual), pixels(hf_cfg)
    rows = GRIDS.prod(-1).tolist()
    separate = [ours(p, g[None]) for p, g in zip(pv.split(rows), GRIDS)]
    together, deepstack = ours(pv, GRIDS)
    assert maxdiff(together, torch.cat([s[0] for s in separate])) < 1e-5
    for i, d in enumerate(deepstack):
        assert maxdiff(d, torch.cat([s[1][i] for s in separate])) < 1e-5

    # Control: if every token could see every other image, the batched call would differ.
    full = vision.make_segments
    monkeypatch.setattr(vision, "make_segments", lambda ids, flash: full(torch.zeros_like(ids), flash))
    leaky = ours(pv, GRIDS)[0]
    assert maxdiff(leaky, torch.cat([s[0] for s in separate])) > 1e-2


@pytest.mark.parametrize("make", [qwen25_visual, qwen3_visual])
@torch.no_grad()
def test_bf16_as_accurate_as_transformers(make):
    """After `.to(bfloat16)` RoPE must still be built in fp32 (pitfall 2). Kernels differ in bf16 (one masked
    SDPA call vs one call per segment, a matmul vs Conv3d), so ask for the same error as transformers' own
    bf16 run, both measured against the fp32 oracle."""
    hf_cfg, visual = make()
    pv = pixels(hf_cfg)
    ref = visual(pv, grid_thw=GRIDS).pooler_output
    ours = ours_from(hf_cfg, visual).to(torch.bfloat16)
    hf_err = maxdiff(visual.to(torch.bfloat16)(pv.bfloat16(), grid_thw=GRIDS).pooler_output.float(), ref)
    ours_err = maxdiff(ours(pv, GRIDS)[0].float(), ref)
    assert ours_err < 1.5 * hf_err, (ours_err, hf_err)


def test_config_from_raw_qwen25_json():
    # The vision_config block of Qwen2.5-VL-7B-Instruct's config.json (old keys: in_chans, no rope_parameters).
    raw = dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
               out_hidden_size=3584, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
               fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2)
    cfg = vision_config_from_hf(raw, out_hidden_size=1024)
    assert cfg == VisionConfig(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                               out_hidden_size=1024, window_size=112, fullatt_block_indexes=(7, 15, 23, 31))
    with pytest.raises(ValueError, match="hidden_act"):
        vision_config_from_hf(dict(raw, hidden_act="gelu_pytorch_tanh"))


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_merger_init_weights(kind):
    torch.manual_seed(0)
    merger = PatchMerger(MergerConfig(in_dim=32, out_dim=96, merge_size=2, kind=kind))
    merger.init_weights()
    norm, fc1, _, fc2 = merger.layers()
    assert fc2.weight.shape == (96, 128)
    for lin in (fc1, fc2):
        assert lin.weight.abs().max() <= 0.04 and 0.015 < lin.weight.std() < 0.025
        assert torch.all(lin.bias == 0)
    assert torch.all(norm.weight == 1)
    out = merger(torch.randn(16, 32))
    assert out.shape == (4, 96) and torch.isfinite(out).all()
