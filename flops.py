"""Model FLOPs of one training step of the VLM, and the device peak they are divided by: MFU.

Counted: matmul FLOPs only, 2 per multiply-add (norms, RoPE, activations, softmax and the embedding lookup are
free), of the work the model needs, not of what an implementation re-does (activation checkpointing's and
flash-attention's recompute are not counted, so MFU does not rise when they are switched on), on real inputs only:
  vision     per patch: patch embed, per block qkv, proj and the MLP (2 or 3 matmuls); attention 4 L^2 hidden per
             segment of L patches: a frame, or a Qwen2.5-VL window (win x win merged tokens, partial at the edges)
             in the blocks that are not fullatt_block_indexes
  mergers    per merged token: fc1 and fc2 of the merger and of each deepstack merger
  decoder    per real text token (image-pad tokens included, pads not): q, k, v, o (GQA widths), the 3 MLP matmuls;
             causal attention per packed document of L tokens: QK^T and PV over the L (L + 1) / 2 query-key pairs
             (the diagonal included: half of full attention plus L), 2 heads*head_dim FLOPs a pair each
  lm_head    on the label positions only (labels[:, 1:] != -100): nothing else reaches it (model.VLM.forward)
Backward, per matmul Y = X W of forward F: the activation gradient dX = dY W^T (F) when X needs a gradient, i.e. a
trainable parameter lies before it, and the weight gradient dW = X^T dY (F) when W trains. Attention (two products
of activations) costs 2F backward when its inputs need gradients. So stage 1 (mergers only) has no vision backward
at all, the mergers their weight gradients and dX (fc1's too: a merger's norm weight, before fc1, trains), the
decoder and lm_head dX only; stage 2 is the textbook 3x forward, less the patch embed's dX (its input is pixels).
tests/test_flops.py checks the matmul terms against torch's FlopCounterMode on the real model, backward included.
Not counted: LoRA's rank-r adapters (set_trainable maps a LoRA part to False) and the blank merge block a text-only
batch runs (model.VLM.embed's vision_always: m*m patches).
"""
from __future__ import annotations

import math

import torch

from model import ModelConfig
from vision import VisionConfig

# Dense bf16 tensor-core peaks (no 2:4 sparsity), TFLOP/s, from NVIDIA's data sheets, keyed by the part of
# torch.cuda.get_device_name() that tells them apart: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100
# NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB" / "NVIDIA A100 80GB PCIe"
# (the same 312), "NVIDIA L40S", "NVIDIA B200". The longest key found in the name wins (H100 PCIe over H100).
PEAK_TFLOPS = {
    "A100": 312.0,
    "L40S": 362.0,
    "H100": 989.4,  # SXM5 (HBM3): the name says no more than "H100 80GB HBM3"
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,  # SXM
    "H200 NVL": 835.0,
    "GH200": 989.4,  # Grace Hopper: the H100/H200 SXM die
    "B200": 2250.0,
    "GB200": 2500.0,  # Grace Blackwell runs its B200s at a higher clock than HGX B200
}


def peak_flops(device_name: str, override_tflops: float = 0) -> float:
    """FLOP/s of the device named `device_name` (torch.cuda.get_device_name), or override_tflops * 1e12 when it is
    set; nan for a device the table does not know (an MFU of nan says "pass --peak-tflops", 0.4 would lie)."""
    if override_tflops:
        return override_tflops * 1e12
    name = device_name.lower()
    found = [key for key in PEAK_TFLOPS if key.lower() in name]
    return PEAK_TFLOPS[max(found, key=len)] * 1e12 if found else math.nan


def window_lengths(v: VisionConfig, h: int, w: int) -> list[int]:
    """Patches in each Qwen2.5-VL attention window of one h x w (patches) frame: windows of win x win merged tokens,
    row-major, the last row and column partial (the segments vision.window_order makes)."""
    m = v.spatial_merge_size
    win = v.window_size // v.patch_size // m

    def sides(n: int) -> list[int]:  # merged tokens per window along one axis
        return [win] * (n // win) + ([n % win] if n % win else [])
    return [a * b * m * m for a in sides(h // m) for b in sides(w // m)]


def vision_flops(v: VisionConfig, grid_thw: list[list[int]], train: dict[str, bool]) -> int:
    """Forward + backward FLOPs of the vision tower and the mergers on images of these (t, h, w) patch grids."""
    D, I, m2 = v.hidden_size, v.intermediate_size, v.spatial_merge_size**2
    grad_x = train["vision"]  # every block's input needs a gradient only when the tower trains (pixels never do)
    N = sum(t * h * w for t, h, w in grid_thw)  # patches
    frames = [(h * w) ** 2 * t for t, h, w in grid_thw]  # sum of L^2 over frames
    windows = [L**2 * t for t, h, w in grid_thw for L in (window_lengths(v, h, w) if v.window_size else [])]

    def linear(fwd: int, weight_trains: bool, input_needs_grad: bool) -> int:
        return fwd * (1 + weight_trains + input_needs_grad)

    row = v.in_channels * v.temporal_patch_size * v.patch_size**2
    total = linear(2 * N * row * D, train["vision"], False)  # patch embed: a Linear on pixel rows
    per_block = 2 * N * D * (3 * D + D + (3 if v.mlp == "swiglu" else 2) * I)  # qkv, proj, MLP
    for i in range(v.depth):
        total += linear(per_block, train["vision"], grad_x)
        windowed = v.window_size > 0 and i not in v.fullatt_block_indexes
        attention = 4 * D * sum(windows if windowed else frames)  # QK^T and PV, non-causal
        total += attention * (1 + 2 * grad_x)
    M = N // m2  # merged tokens; fc1 (m2 D -> m2 D) and fc2 (m2 D -> out) per merger
    into_fc = train["merger"] or grad_x  # a trained merger's norm weight comes before fc1: fc1 gets dX too
    for _ in range(1 + len(v.deepstack_indexes)):
        total += linear(2 * M * m2 * D * m2 * D, train["merger"], into_fc)
        total += linear(2 * M * m2 * D * v.out_hidden_size, train["merger"], into_fc)
    return total


def step_flops(cfg: ModelConfig, batch: dict, train: dict[str, bool]) -> float:
    """Model FLOPs (forward + backward) of one micro-batch as data.collate makes it (input_ids (B, T), labels,
    attention_mask, doc_ids when packed, image_grid_thw / video_grid_thw (n, 3) in patches), with the parts
    train.set_trainable returns ({"vision": bool, "merger": bool, "llm": bool}) trained."""
    t = cfg.text
    B, T = batch["input_ids"].shape
    mask = batch.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones(B, T, dtype=torch.bool)
    # packed documents as model.plan_attention cuts them: a row's real tokens, split where doc_ids changes
    ids = torch.arange(B)[:, None] * (T + 1) + (batch["doc_ids"] if batch.get("doc_ids") is not None else 0)
    lengths = torch.unique_consecutive(ids.expand(B, T)[real], return_counts=True)[1].tolist()
    n_tokens, n_labels = sum(lengths), int((batch["labels"][:, 1:] != -100).sum())

    grids = [g for k in ("image_grid_thw", "video_grid_thw") if batch.get(k) is not None for g in batch[k].tolist()]
    vision_in = cfg.vision is not None and (train["vision"] or train["merger"])
    grad_x = train["llm"] or vision_in  # the decoder's input needs a gradient (embed_tokens or the image features)
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    per_layer = 2 * n_tokens * (t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size)
    attention = 2 * q * sum(L * (L + 1) for L in lengths)  # 2 products x L(L+1)/2 pairs x 2 q*hd FLOPs
    head = 2 * n_labels * t.hidden_size * t.vocab_size
    total = t.num_layers * (per_layer * (1 + train["llm"] + grad_x) + attention * (1 + 2 * grad_x))
    total += head * (1 + train["llm"] + grad_x)
    if cfg.vision is not None and grids:
        total += vision_flops(cfg.vision, grids, train)
    return float(total)
