"""flops.py: the step's model FLOPs == a hand count on a tiny VLM (stage 1 and stage 2), == torch's FlopCounterMode on
the real model's matmuls (forward and backward, each way of training), Qwen2.5-VL windows == vision.window_order's,
and the device peaks told apart by name."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flops
import model as M
import train
import vision as V

STAGE1 = dict(vision=False, merger=True, llm=False)
STAGE2 = dict(vision=True, merger=True, llm=True)
IMAGE = 49


def tiny(qwen25: bool = False) -> M.ModelConfig:
    """Qwen3-VL-like (LayerNorm, GELU MLP, one deepstack merger, tied) or Qwen2.5-VL-like (RMSNorm, SwiGLU, windows of
    2x2 merged tokens with block 1 full, q/k/v biases, untied)."""
    vision = V.VisionConfig(depth=2, hidden_size=16, num_heads=2, intermediate_size=24, out_hidden_size=32,
                            patch_size=2, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    if qwen25:
        vision = V.VisionConfig(**{**vision.__dict__, "window_size": 8, "fullatt_block_indexes": (1,)})
    else:
        vision = V.VisionConfig(**{**vision.__dict__, "norm": "layer", "mlp": "gelu_tanh", "patch_bias": True,
                                   "num_position_embeddings": 16, "deepstack_indexes": (0,)})
    text = M.TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, rope_theta=1e4, mrope_section=(2, 1, 1),
                        mrope_interleaved=not qwen25, tie_word_embeddings=not qwen25, qkv_bias=qwen25,
                        qk_norm=not qwen25)
    return M.ModelConfig(text, vision, image_token_id=IMAGE, vision_start_token_id=47, vision_end_token_id=48)


def packed_batch(pads: int = 2) -> dict:
    """One packed row as data.collate makes it: doc 1 = 12 tokens with a 4x4-patch image (4 image tokens), doc 2 = 6
    tokens with a 2x4-patch image (2 image tokens), then `pads` pads; 4 + 3 label tokens."""
    T = 18 + pads
    ids = torch.randint(0, 40, (1, T), generator=torch.Generator().manual_seed(0))
    ids[0, 2:6], ids[0, 14:16] = IMAGE, IMAGE
    labels = torch.full((1, T), -100)
    labels[0, 8:12], labels[0, 15:18] = ids[0, 8:12], ids[0, 15:18]
    doc_ids = torch.tensor([[1] * 12 + [2] * 6 + [0] * pads])
    return dict(input_ids=ids, labels=labels, attention_mask=(doc_ids > 0).long(), doc_ids=doc_ids,
                image_grid_thw=torch.tensor([[1, 4, 4], [1, 2, 4]]))


def test_hand_count_stage1_and_stage2():
    cfg, batch = tiny(), packed_batch()
    # vision: 16 + 8 = 24 patches of 3*2*2*2 = 24 values, hidden 16, MLP 24; 6 merged tokens of 4*16 = 64
    patch_embed = 2 * 24 * 24 * 16
    block_linears = 2 * (2 * 24 * 16 * 48 + 2 * 24 * 16 * 16 + 2 * 24 * 16 * 24 + 2 * 24 * 24 * 16)  # qkv proj fc1 fc2
    vision_attention = 2 * 4 * 16 * (16**2 + 8**2)  # 2 blocks, one frame per image, QK^T + PV non-causal
    mergers = 2 * (2 * 6 * 64 * 64 + 2 * 6 * 64 * 32)  # the merger and the deepstack merger: fc1, fc2
    # decoder: 18 real tokens (the 2 pads are not), q 4x8 = 32 wide, k and v 2x8 = 16, MLP 48, 2 layers
    decoder_linears = 2 * (2 * 18 * 32 * 32 + 2 * 2 * 18 * 32 * 16 + 2 * 18 * 32 * 32 + 3 * 2 * 18 * 32 * 48)
    pairs = 12 * 13 // 2 + 6 * 7 // 2  # causal query-key pairs, diagonal included, per document
    decoder_attention = 2 * 2 * (2 * 32 * pairs)  # 2 layers x (QK^T + PV) x 2*32 FLOPs a pair
    lm_head = 2 * 7 * 32 * 50  # 7 label positions only
    forward = patch_embed + block_linears + vision_attention + mergers + decoder_linears + decoder_attention + lm_head

    # stage 1: no vision backward; mergers dW + dX; decoder and lm_head dX only (attention: dQ, dK, dV = 2x)
    stage1 = forward + 2 * mergers + decoder_linears + 2 * decoder_attention + lm_head
    # stage 2: dW + dX everywhere, the patch embed dW only (pixels need no gradient)
    stage2 = forward + patch_embed + 2 * (block_linears + vision_attention + mergers + decoder_linears
                                          + decoder_attention + lm_head)
    assert flops.step_flops(cfg, batch, dict(vision=False, merger=False, llm=False)) == forward
    assert flops.step_flops(cfg, batch, STAGE1) == stage1
    assert flops.step_flops(cfg, batch, STAGE2) == stage2
    assert stage1 < stage2
    # unpacked (no doc_ids): one segment of 18, so attention grows; a text-only batch has no vision at all
    one_doc = {k: v for k, v in batch.items() if k != "doc_ids"}
    assert flops.step_flops(cfg, one_doc, STAGE2) - stage2 == 3 * 2 * 2 * (2 * 32) * (18 * 19 // 2 - pairs)
    text_only = {k: v for k, v in batch.items() if k != "image_grid_thw"}
    assert flops.step_flops(cfg, text_only, STAGE2) == stage2 - 2 * patch_embed - 3 * (
        block_linears + vision_attention + mergers)
    # the same patches as a video (its frames attend within themselves, as the images do) count the same;
    # a video of grid (2, 2, 4) in place of the 4x4 image attends per frame: 2 * 8^2 rather than one 16^2
    as_video = dict(text_only, video_grid_thw=batch["image_grid_thw"])
    assert flops.step_flops(cfg, as_video, STAGE2) == stage2
    frames = dict(text_only, image_grid_thw=torch.tensor([[1, 2, 4]]), video_grid_thw=torch.tensor([[2, 2, 4]]))
    assert flops.step_flops(cfg, frames, STAGE2) == stage2 - 3 * 2 * 4 * 16 * (16**2 - 2 * 8**2)


@pytest.mark.parametrize("qwen25", [False, True], ids=["qwen3vl", "qwen25vl"])
def test_matmuls_equal_flop_counter_on_the_model(qwen25):
    """FlopCounterMode counts the mm/addmm autograd really runs (its CPU SDPA is not counted: attention is added by
    hand), so a forgotten matmul or a wrong rule for which gradients flow shows up here."""
    cfg, batch = tiny(qwen25), packed_batch(pads=0)  # pads would go through the real model's Linears
    model = M.VLM(cfg)
    pixel_values = torch.randn(24, 24)
    vision_attention = 2 * 4 * 16 * (16**2 + 8**2)  # each image fits one 2x2-merged window: windows == frames
    decoder_attention = 2 * 2 * 2 * 32 * (12 * 13 // 2 + 6 * 7 // 2)
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    for trained in (dict(vision=False, merger=False, llm=False), STAGE1, STAGE2, dict(vision=False, merger=False,
                    llm=True), dict(vision=True, merger=False, llm=False)):
        for name, p in model.named_parameters():
            p.requires_grad_(trained[train.part_of(name)])
        backward = any(trained.values())
        with FlopCounterMode(display=False) as counter:
            loss = model(batch["input_ids"], pixel_values, batch["image_grid_thw"], doc_ids=batch["doc_ids"],
                         attention_mask=batch["attention_mask"], labels=batch["labels"])
            if backward:
                loss.backward()
        recompute = 2 * n_labels * 32 * 50 if backward else 0  # chunked_cross_entropy recomputes the head's logits
        attention = vision_attention * (1 + 2 * trained["vision"]) + decoder_attention * (1 + 2 * backward)
        assert counter.get_total_flops() - recompute + attention == flops.step_flops(cfg, batch, trained), trained


@pytest.mark.parametrize("t,h,w", [(1, 10, 6), (2, 8, 8), (1, 2, 14), (1, 4, 2)])
def test_window_lengths_equal_window_order(t, h, w):
    v = tiny(qwen25=True).vision
    grid = torch.tensor([[t, h, w]])
    _, window = V.window_order(V.patch_grid(grid, 2), 2, v.window_size // v.patch_size // 2)
    want = (torch.unique_consecutive(window, return_counts=True)[1] * 4).tolist()
    assert flops.window_lengths(v, h, w) * t == want


def test_windowed_blocks_count_window_attention():
    """(1, 10, 6) patches = 5x3 merged tokens: windows of 2x2, 2x1, 2x2, 2x1, 1x2, 1x1 merged = 16, 8, 16, 8, 8, 4
    patches in block 0; block 1 (fullatt) attends over the frame's 60."""
    cfg = tiny(qwen25=True)
    batch = dict(input_ids=torch.full((1, 15), IMAGE), labels=torch.full((1, 15), -100),
                 image_grid_thw=torch.tensor([[1, 10, 6]]))
    full = M.ModelConfig(cfg.text, V.VisionConfig(**{**cfg.vision.__dict__, "window_size": 0,
                                                     "fullatt_block_indexes": ()}), image_token_id=IMAGE)
    frozen = dict(vision=False, merger=False, llm=False)
    windows = 16**2 + 8**2 + 16**2 + 8**2 + 8**2 + 4**2
    assert flops.step_flops(full, batch, frozen) - flops.step_flops(cfg, batch, frozen) == 4 * 16 * (60**2 - windows)


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362), ("NVIDIA B200", 2250),
])
def test_peak_from_device_name(name, tflops):
    assert flops.peak_flops(name) == pytest.approx(tflops * 1e12)


def test_peak_unknown_and_override():
    assert math.isnan(flops.peak_flops("NVIDIA GeForce RTX 4090")) and math.isnan(flops.peak_flops(""))
    assert math.isnan(flops.peak_flops("NVIDIA H20"))  # not an H200
    assert flops.peak_flops("NVIDIA H100 PCIe", override_tflops=500) == 500e12
    assert flops.peak_flops("whatever", override_tflops=123.5) == 123.5e12
