"""Qwen vision towers (Qwen2.5-VL and Qwen3-VL) in plain PyTorch.

pixel_values (N, C*T*p*p) -> patch embed (+ learned pos-embed) -> `depth` pre-norm ViT blocks with 2-D RoPE,
attention restricted to one frame (or one window) -> 2x2 merger -> (N/4, out_hidden_size) LLM tokens.
Rows of pixel_values come in the processor's block-major order: per frame, (block_row, block_col, in_row,
in_col), so every 4 consecutive rows are one 2x2 block (= one merged token).
Module names mirror the checkpoint's `visual.*` tensors, so `load_state_dict(strict=True)` needs no table.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import Segments, kernel_for, make_segments, segment_attention
from merger import MergerConfig, PatchMerger, make_norm


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int                      # merger output width = the LLM's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    norm: str = "rms"                         # "rms" | "layer" (blocks and merger)
    mlp: str = "swiglu"                       # "swiglu" (SiLU-gated, biased) | "gelu_tanh" (fc1-GELU-fc2)
    patch_bias: bool = False
    num_position_embeddings: int = 0          # learned square pos-embed table; 0 = none
    window_size: int = 0                      # window side in pixels; 0 = no window attention
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks that attend over the whole frame when windowed
    deepstack_indexes: tuple[int, ...] = ()   # blocks whose output also goes through a deepstack merger
    rope_theta: float = 10000.0


# ---------------------------------------------------------------------------------------------------
# Index bookkeeping from grid_thw: pure functions of the image sizes, no weights.

class PatchGrid(NamedTuple):
    row: torch.Tensor      # (N,) patch row inside its frame
    col: torch.Tensor      # (N,) patch column inside its frame
    frame: torch.Tensor    # (N,) global frame index (images and video frames alike)
    frame_h: torch.Tensor  # (F,) patch rows per frame
    frame_w: torch.Tensor  # (F,) patch columns per frame


def patch_grid(grid_thw: torch.Tensor, m: int) -> PatchGrid:
    """Decode every pixel_values row into (row, col, frame), inverting the processor's block-major layout."""
    t, h, w = grid_thw.long().unbind(1)
    frame_h, frame_w = h.repeat_interleave(t), w.repeat_interleave(t)        # (F,)
    counts = frame_h * frame_w
    frame = torch.arange(len(counts), device=grid_thw.device).repeat_interleave(counts)  # (N,)
    start = F.pad(counts.cumsum(0)[:-1], (1, 0))[frame]
    i = torch.arange(len(frame), device=grid_thw.device) - start               # index inside the frame
    blocks_w = frame_w[frame] // m
    row = i // (m * m * blocks_w) * m + (i // m) % m                          # block_row*m + in_row
    col = (i // (m * m)) % blocks_w * m + i % m                               # block_col*m + in_col
    return PatchGrid(row, col, frame, frame_h, frame_w)


def window_order(g: PatchGrid, m: int, win: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL window attention: merged tokens of each frame are cut into win x win windows (the last
    row/column of windows may be partial). Returns the permutation of merged tokens into window order
    (frames in order, windows row-major, tokens row-major inside a window) and each permuted token's
    window id. Same order as transformers' get_vision_window_index, without its per-image loop."""
    r, c, f = g.row[:: m * m] // m, g.col[:: m * m] // m, g.frame[:: m * m]   # (M,) merged-token coords
    n_wh = (g.frame_h // m + win - 1) // win                                  # (F,) windows per column
    n_ww = (g.frame_w // m + win - 1) // win                                  # (F,) windows per row
    first = F.pad((n_wh * n_ww).cumsum(0)[:-1], (1, 0))                       # (F,) first window id
    window = first[f] + (r // win) * n_ww[f] + c // win                       # (M,) global window id
    order = torch.argsort(window * win * win + (r % win) * win + c % win)     # keys are unique
    return order, window[order]


def rope_cos_sin(row: torch.Tensor, col: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, ...]:
    """2-D RoPE angles in fp32, as transformers' VisionRotaryEmbedding: a quarter of head_dim frequencies,
    [row * inv_freq, col * inv_freq] fills half the head, repeated for rotate_half. Recomputed on every call
    (it is tiny) so `model.to(bfloat16)` can never round inv_freq (pitfall 2)."""
    d = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # on CPU, like HF's init
    inv_freq = inv_freq.to(row.device)
    freqs = torch.cat([row[:, None].float() * inv_freq, col[:, None].float() * inv_freq], dim=-1)  # (N, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                                   # (N, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (N, nh, hd) in the model dtype; cos/sin: (N, hd) fp32. Vision rotates in fp32, then casts back.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)                                    # rotate_half
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def pos_embed_taps(g: PatchGrid, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear, align_corners resampling of a side x side table to each frame's grid, as 4 (index, weight)
    taps per patch. Matches transformers 5.x get_vision_interpolation_indices_and_weights: the source
    coordinate is i*(side-1)/(n-1) in fp32 and the weights stay fp32 (4.57 rounded them to bf16)."""
    def axis(index, size):
        src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
        floor = torch.floor(src)
        offsets = torch.arange(2, device=index.device)                        # floor, floor+1
        taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)           # ceil tap clamped at the edge
        weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
        return taps, weights
    h_taps, h_w = axis(g.row, g.frame_h[g.frame])
    w_taps, w_w = axis(g.col, g.frame_w[g.frame])
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)  # (N, 4)
    weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)              # (N, 4) fp32
    return index, weight


# ---------------------------------------------------------------------------------------------------
# Layers.

class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # Kept as Conv3d so the checkpoint's (D, C, T, p, p) weight loads as is.
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=cfg.patch_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, C*T*p*p), each row laid out (C, T, py, px) like the conv weight. A conv whose kernel equals
        # its stride and its input is one matmul; F.linear avoids slow Conv3d kernels.
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.flatten(1), self.proj.bias)          # (N, D)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, seg: Segments) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, self.head_dim).unbind(1)  # each (N, nh, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = segment_attention(q, k, v, seg, causal=False)                     # (N, nh, hd)
        return self.proj(o.reshape(N, -1))


class SwiGLUMLP(nn.Module):  # Qwen2.5-VL: SiLU-gated, with biases
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):  # Qwen3-VL: fc1 -> GELU (tanh approximation) -> fc2
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.hidden_size)
        self.norm2 = make_norm(cfg.norm, cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.mlp = SwiGLUMLP(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)

    def forward(self, x, cos, sin, seg: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seg)
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D, m = cfg.hidden_size, cfg.spatial_merge_size
        side = round(cfg.num_position_embeddings ** 0.5)
        if D % cfg.num_heads or (D // cfg.num_heads) % 4:
            raise ValueError(f"hidden_size {D} / num_heads {cfg.num_heads} must be a head_dim divisible by 4")
        if side * side != cfg.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {cfg.num_position_embeddings} is not a square")
        if cfg.window_size % (m * cfg.patch_size):
            raise ValueError(f"window_size {cfg.window_size} is not a multiple of merge*patch {m * cfg.patch_size}")
        if cfg.norm not in ("rms", "layer") or cfg.mlp not in ("swiglu", "gelu_tanh"):
            raise ValueError(f"unknown norm {cfg.norm!r} or mlp {cfg.mlp!r}")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, D) if cfg.num_position_embeddings else None
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))

        def merger_config(postshuffle: bool) -> MergerConfig:
            return MergerConfig(D, cfg.out_hidden_size, m, kind=cfg.norm, postshuffle_norm=postshuffle)

        self.merger = PatchMerger(merger_config(False))
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(merger_config(True)) for _ in cfg.deepstack_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values (N, C*T*p*p), grid_thw (n_images, 3) in patch units -> merged tokens (N/m^2, out) in
        raster 2x2-block order, plus one (N/m^2, out) tensor per deepstack index."""
        cfg, m = self.cfg, self.cfg.spatial_merge_size
        if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0] or bool((grid_thw[:, 1:] % m).any()):
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but grid_thw {grid_thw.tolist()} "
                             f"needs sum(t*h*w) rows with h, w multiples of {m}")
        g = patch_grid(grid_thw, m)
        x = self.patch_embed(pixel_values)                                    # (N, D)
        if self.pos_embed is not None:
            index, weight = pos_embed_taps(g, round(cfg.num_position_embeddings ** 0.5))
            x = x + (self.pos_embed(index) * weight[:, :, None]).sum(1).to(x.dtype)
        cos, sin = rope_cos_sin(g.row, g.col, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        kernel = kernel_for(x)  # a varlen kernel on CUDA in bf16, else SDPA per segment length

        frame, order = g.frame, None
        if cfg.window_size:
            # Permute whole 2x2 blocks into window order so each window is contiguous (segments need
            # that); the merger works on any block order, so the permutation is undone after it.
            order, window = window_order(g, m, cfg.window_size // m // cfg.patch_size)
            rows = (order[:, None] * m * m + torch.arange(m * m, device=order.device)).flatten()  # (N,)
            x, cos, sin, frame = x[rows], cos[rows], sin[rows], frame[rows]
            windows = make_segments(window.repeat_interleave(m * m), kernel)
        frames = make_segments(frame, kernel)  # full attention is per frame, never across frames

        deepstack = []
        for i, block in enumerate(self.blocks):
            windowed = cfg.window_size > 0 and i not in cfg.fullatt_block_indexes
            x = block(x, cos, sin, windows if windowed else frames)
            if i in cfg.deepstack_indexes:
                deepstack.append(self.deepstack_merger_list[cfg.deepstack_indexes.index(i)](x))
        out = self.merger(x)                                                  # (N/m^2, out_hidden_size)
        if order is not None:
            undo = torch.argsort(order)
            out, deepstack = out[undo], [d[undo] for d in deepstack]
        return out, deepstack
