"""The Qwen3 decoder and the VLM around it, in plain PyTorch.

Read top to bottom: config -> norms and RoPE -> the one attention helper -> the KV cache -> the decoder blocks
-> 3-D positions (rope_index) -> the VLM (vision features scattered into the text, deepstack) -> reading an HF
config.json (the one place that knows its keys). Module names mirror the Hugging Face checkpoints
(`model.layers.0.self_attn.q_proj`, `visual.blocks.0...`), so loading (weights.from_pretrained) is a short table of
prefix rules and no weight is permuted.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import Segments, kernel_for, make_segments, segment_attention
from merger import RMSNorm  # one RMSNorm for text and vision: fp32 normalise, cast back, then scale
from vision import VisionConfig, VisionTower


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # from config.json: Qwen3-0.6B has 16 heads x 128 != hidden 1024
    rope_theta: float
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 / Qwen2.5-VL decoder: biases on q, k, v (never on o)
    qk_norm: bool = True  # Qwen3: per-head RMSNorm on q and k before RoPE
    mrope_section: tuple[int, ...] = ()  # () = 1-D RoPE; (t, h, w) frequency counts for 3-D M-RoPE
    mrope_interleaved: bool = False  # Qwen3-VL: THWTHW... ; Qwen2.5-VL: TTT..HHH..WWW (sectioned)


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig | None = None  # None: a text-only LLM
    image_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    video_token_id: int | None = None
    # Qwen2.5-VL's time-aligned M-RoPE: a video's temporal position advances this much per second (config
    # vision_config.tokens_per_second). None: Qwen3-VL, whose prompt writes each frame group's time as text.
    tokens_per_second: float | None = None


# ----------------------------------------------------------------------------------------------------------------
# rotary embeddings


@functools.lru_cache(maxsize=None)
def rope_inv_freq(theta: float, dim: int, device: torch.device) -> torch.Tensor:
    # computed on the CPU in fp32 like HF's buffer, then moved: the same bits on every device and never cast
    # to bf16 by model.to(dtype), because it is not a buffer at all
    return (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).to(device)


@functools.lru_cache(maxsize=None)
def mrope_axis(section: tuple[int, ...], interleaved: bool, device: torch.device) -> torch.Tensor:
    """Which position row (0 = t, 1 = h, 2 = w) drives each of the head_dim/2 frequencies."""
    t, h, w = section
    if interleaved:  # Qwen3-VL: T everywhere, then every third frequency from 1 is H and from 2 is W
        axis = torch.zeros(t + h + w, dtype=torch.long)
        axis[1 : 3 * h : 3] = 1
        axis[2 : 3 * w : 3] = 2
    else:  # Qwen2.5-VL: the first t frequencies follow T, the next h follow H, the last w follow W
        axis = torch.tensor([0] * t + [1] * h + [2] * w)
    return axis.to(device)


def rope_cos_sin(positions: torch.Tensor, cfg: TextConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T), or (3, B, T) for M-RoPE -> cos, sin (B, T, head_dim) in `dtype`."""
    inv_freq = rope_inv_freq(cfg.rope_theta, cfg.head_dim, positions.device)
    freqs = positions[..., None].float() * inv_freq  # ([3,] B, T, hd/2), fp32
    if positions.dim() == 3:  # pick each frequency's angle from its own axis of the 3-D position
        axis = mrope_axis(cfg.mrope_section, cfg.mrope_interleaved, positions.device)
        freqs = freqs.gather(0, axis.expand_as(freqs[:1])).squeeze(0)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: both halves share the frequencies
    return emb.cos().to(dtype), emb.sin().to(dtype)  # rounded to the model dtype before use, as HF does


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, nh, hd); cos, sin (B, T, hd). Elementwise, so the same numbers as HF's (B, nh, T, hd) layout."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------------------
# attention: segments for training and prefill (attention.py); a padding mask for steps that continue a cache


class KVCache:
    """Per layer, preallocated (B, kv_heads, max_len, head_dim) keys and values, owned by the caller and passed to
    each forward, which writes its T new tokens in place at slots `cache_position` (index_copy_, never a new
    buffer) and, when called without cache_position, advances `length` (the slots written) by T.

    static=False reads back only the slots written so far (the least work, on CPU); static=True always reads all
    max_len slots with a mask over the unwritten ones: one shape for a whole generation, so a compiled decode step
    (and its CUDA graph) is made once. `rope_delta` (B, 1) is the VLM's 3-D position offset: a new token's
    position = its index among the real tokens + rope_delta (HF's rope_deltas); the prefill forward sets it.
    `dtype` is normally the model's; a wider one makes attention run in it at twice the bytes read per token.
    """

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 static: bool = False):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length, self.static, self.rope_delta = 0, static, None
        if static:  # the buffers keep their addresses: a CUDA graph may capture them
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor):
        """Write k, v (B, nkv, T, hd) at slots `at` (T,); return the keys and values to attend over."""
        self.k[layer].index_copy_(2, at, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, at, v.to(self.v[layer].dtype))
        if self.static:
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class AttentionPlan(NamedTuple):
    """How one forward attends, decided once for all its layers."""
    at: torch.Tensor | None  # (T,) cache slots of the new tokens; None without a cache
    real: torch.Tensor | None  # segments: flat indices of the real tokens of (B*T); None = all are real
    segments: Segments | None  # training and prefill: each row's real tokens, split by packed document
    mask: torch.Tensor | None  # a cache continuation: (B|1, 1, T, slots) True = may attend; None = all


def plan_attention(B: int, T: int, x: torch.Tensor, padding, doc_ids, cache: KVCache | None, at) -> AttentionPlan:
    """Training and a cache's first forward (prefill) attend over segments, never a (T, T) mask. A forward that
    continues a cache attends over its slots: causal by slot (a new token at slot s sees slots <= s, bottom-right
    aligned), without pads and, when static, without the slots not written yet."""
    if cache is None or (at is None and cache.length == 0):
        ids = torch.arange(B, device=x.device)[:, None] * (T + 1)  # a row's tokens never meet another row's
        ids = (ids + doc_ids if doc_ids is not None else ids.expand(B, T)).flatten()
        real = padding.bool().flatten().nonzero().squeeze(1) if padding is not None else None
        segments = make_segments(ids if real is None else ids[real], kernel_for(x))
        return AttentionPlan(at if at is not None or cache is None else torch.arange(T, device=x.device),
                             real, segments, None)
    if doc_ids is not None:
        raise ValueError("doc_ids (packed documents) are for training and prefill, not for continuing a cache")
    if at is None:
        at = torch.arange(cache.length, cache.length + T, device=x.device)
    slots = cache.max_len if cache.static else cache.length + T
    if not cache.static and padding is None and T == 1:
        return AttentionPlan(at, None, None, None)  # one new token sees every slot: no mask at all
    if T > 1 and x.is_cuda:
        raise ValueError(f"continuing a KV cache with {T} tokens at once needs a dense (B, 1, {T}, {slots}) mask, "
                         "which SDPA runs in its fp32 math kernel on CUDA: prefill the prompt in one forward "
                         "(an empty cache) and decode one token a step")
    k_pos = torch.arange(slots, device=x.device)
    mask = (k_pos[None, :] <= at[:, None])[None, None]  # (1, 1, T, slots)
    if padding is not None:
        mask = mask & padding[:, None, None, :slots].bool()
    return AttentionPlan(at, None, None, mask | (k_pos[None, :] == at[:, None]))  # a pad query sees itself


def cached_attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, nh, T, hd) new tokens; k, v (B, nkv, S, hd) cache slots -> (B, nh, T, hd)."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    if T == 1 and nkv != nh:  # a decode step: each kv head's query heads become its query rows (h -> h // group,
        # as enable_gqa pairs them), so no key or value is copied per query head; the mask (B, 1, 1, S) broadcasts
        y = F.scaled_dot_product_attention(q.view(B, nkv, nh // nkv, hd), k, v, attn_mask=mask)
        return y.view(B, nh, 1, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)


# ----------------------------------------------------------------------------------------------------------------
# the decoder


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # one weight of head_dim shared by all heads, applied before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, plan: AttentionPlan, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # (B, T, nkv, hd) -> (B, nkv, T, hd), the cache's layout
            keys, values = cache.update(self.layer, k.transpose(1, 2), v.transpose(1, 2), plan.at)
        if plan.segments is not None:  # only this forward's tokens: (B, T, h, hd) -> (B*T, h, hd), real ones
            q, k, v = (t.reshape(B * T, -1, self.hd) for t in (q, k, v))
            if plan.real is not None:
                q, k, v = q[plan.real], k[plan.real], v[plan.real]
            y = segment_attention(q, k, v, plan.segments, causal=True)
            if plan.real is not None:  # pads' outputs are zeros: no loss, no later token reads them
                y = y.new_zeros(B * T, self.nh, self.hd).index_copy(0, plan.real, y)
        else:
            y = cached_attention(q.transpose(1, 2).to(keys.dtype), keys, values, plan.mask).transpose(1, 2)
        return self.o_proj(y.reshape(B, T, self.nh * self.hd).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, plan: AttentionPlan, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """embed_tokens -> layers -> norm. Named `model` in the VLM, as in the checkpoints."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, padding=None, doc_ids=None, cache=None, visual_mask=None, deepstack=(),
                cache_position=None):
        """x (B, T, D) embeddings; positions (B, T) or (3, B, T); padding (B, slots): 1 real, 0 pad.

        With a cache and no cache_position the T tokens go to the next free slots and cache.length advances;
        a compiled decode step passes cache_position (T,) and keeps count itself (see sample.generate)."""
        B, T, _ = x.shape
        if cache is not None and cache_position is None and cache.length + T > cache.max_len:
            raise ValueError(f"KV cache full: {cache.length + T} tokens do not fit in max_len={cache.max_len}")
        cos, sin = rope_cos_sin(positions, self.cfg, x.dtype)
        plan = plan_attention(B, T, x, padding, doc_ids, cache, cache_position)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, plan, cache)
            if i < len(deepstack):  # Qwen3-VL: vision block features added to the first layers' outputs
                x = x.masked_scatter(visual_mask[..., None], x[visual_mask] + deepstack[i].to(x.dtype))
        if cache is not None and cache_position is None:
            cache.length += T
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------
# 3-D positions


def rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
    merge_size: int,
    padding: torch.Tensor | None = None,
    *,
    video_grid_thw: torch.Tensor | None = None,
    video_token_id: int | None = None,
    second_per_grid_ts: torch.Tensor | list[float] | None = None,
    tokens_per_second: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D M-RoPE positions, transformers' get_rope_index (5.23) for text, images and videos.

    Text runs count up on all three rows. An image of llm grid (t, h, w) = grid_thw / (1, m, m) takes
    t*h*w tokens at (start + ti, start + hi, start + wi), and the text after it resumes at start + max(h, w).
    Videos, two ways:
    - tokens_per_second set (Qwen2.5-VL, time-aligned M-RoPE): one block of T*h*w video pads whose temporal
      index is (ti * tokens_per_second * second_per_grid_t).long() (second_per_grid_t = temporal_patch_size / fps
      of the video, default 1.0); the text after it still resumes at start + max(h, w), as transformers does;
    - tokens_per_second None (Qwen3-VL): the prompt carries a "<t seconds>" text per frame group, so a video of
      grid (T, h, w) is T blocks of h*w pads, each placed like an image (t = 1).
    Pads are skipped (their position is 0). Returns positions (3, B, T) and rope_delta (B, 1) =
    max position + 1 - number of real tokens, which continues the positions while decoding.
    """
    B, T = input_ids.shape
    positions = torch.zeros(3, B, T, dtype=torch.long, device=input_ids.device)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)
    images = image_grid_thw.tolist() if image_grid_thw is not None else []
    videos = video_grid_thw.tolist() if video_grid_thw is not None else []
    if tokens_per_second is None:  # Qwen3-VL: each frame group is its own block
        videos, steps = [(1, h, w) for t, h, w in videos for _ in range(t)], []
    else:  # transformers multiplies in fp32 (second_per_grid_ts is a float32 tensor) and truncates with .long()
        secs = torch.as_tensor(second_per_grid_ts if second_per_grid_ts is not None else [1.0] * len(videos),
                               dtype=torch.float32).cpu()
        if len(secs) != len(videos):
            raise ValueError(f"{len(secs)} second_per_grid_ts for {len(videos)} videos in video_grid_thw")
        steps = [tokens_per_second * s for s in secs]
    grids = {1: iter(images), 2: iter(videos)}
    steps = iter(steps)
    for b in range(B):
        real = padding[b].bool() if padding is not None else torch.ones(T, dtype=torch.bool, device=input_ids.device)
        ids = input_ids[b, real]
        # without video_grid_thw there is no video: a video-pad id (say, one a model generated) is text
        video = ids == video_token_id if video_grid_thw is not None else torch.zeros_like(ids, dtype=torch.bool)
        kind = ((ids == image_token_id).long() + 2 * video.long()).tolist()  # 0 text, 1 image, 2 video
        pos, start, i, n = [], 0, 0, len(kind)
        while i < n:
            if kind[i]:  # one image or video block: its tokens are consumed by its grid, so adjacent ones stay apart
                try:
                    t, h, w = next(grids[kind[i]])
                except StopIteration:
                    name = "image" if kind[i] == 1 else "video"
                    raise ValueError(f"row {b}: more {name} tokens than {name}s in {name}_grid_thw") from None
                h, w = h // merge_size, w // merge_size
                ti = torch.arange(t)
                if kind[i] == 2 and tokens_per_second is not None:  # Qwen2.5-VL: seconds -> temporal positions
                    ti = (ti * next(steps)).long()
                grid = torch.stack(torch.meshgrid(ti, torch.arange(h), torch.arange(w), indexing="ij"))
                pos.append(grid.reshape(3, -1) + start)
                start, i = start + max(h, w), i + t * h * w
            else:
                j = i
                while j < n and not kind[j]:
                    j += 1
                pos.append(torch.arange(start, start + j - i).expand(3, -1))
                start, i = start + j - i, j
        row = torch.cat(pos, dim=1) if pos else torch.zeros(3, 0, dtype=torch.long)
        if row.shape[1] != n:
            raise ValueError(f"row {b}: an image's or video's tokens are cut off ({n} real tokens, the grids need "
                             f"{row.shape[1]})")
        positions[:, b, real] = row.to(positions.device)
        deltas[b] = (row.max() + 1 - n) if n else 0
    return positions, deltas


# ----------------------------------------------------------------------------------------------------------------
# the VLM


class VLM(nn.Module):
    """Vision tower (+ merger) -> image features in place of the image-pad tokens -> Qwen3 decoder -> logits.

    With cfg.vision None it is a plain text LLM (Qwen3ForCausalLM / Qwen2ForCausalLM).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg.text)
        self.visual = VisionTower(cfg.vision) if cfg.vision is not None else None
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def positions(self, input_ids, image_grid_thw=None, padding=None, cache: KVCache | None = None,
                  video_grid_thw=None, second_per_grid_ts=None):
        """Default positions: 1-D for text LLMs, 3-D (rope_index) for VLMs; continued from the cache."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past == 0 and self.cfg.text.mrope_section:
            pos, delta = rope_index(input_ids, image_grid_thw, self.cfg.image_token_id,
                                    self.cfg.vision.spatial_merge_size, padding, video_grid_thw=video_grid_thw,
                                    video_token_id=self.cfg.video_token_id, second_per_grid_ts=second_per_grid_ts,
                                    tokens_per_second=self.cfg.tokens_per_second)
            if cache is not None:
                cache.rope_delta = delta
            return pos
        if padding is not None:  # a token's position counts the real tokens before it
            pos = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        else:
            pos = torch.arange(past, past + T, device=input_ids.device).expand(B, -1)
        if cache is not None and cache.rope_delta is not None:
            pos = pos + cache.rope_delta
        return pos

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, vision_always: bool = False,
              pixel_values_videos=None, video_grid_thw=None):
        """Token embeddings with the merged image features written over the image-pad tokens and the video
        features over the video-pad tokens. Returns (x, visual_mask (B, T) = image or video pads, deepstack).

        Images and videos go through the tower in one call (a video is frames of one grid, t > 1), so every
        forward runs it once. vision_always: a batch without images or videos still runs the tower, on one blank
        merge block whose outputs are added times zero. Under FSDP every rank must run the same collectives
        (all-gathers forward, reduce-scatters backward) in the same order, so a text-only rank beside an image
        rank would otherwise hang.
        """
        x = self.model.embed_tokens(input_ids)
        if pixel_values is None and pixel_values_videos is None:
            if vision_always and self.visual is not None:
                v = self.cfg.vision
                m, row = v.spatial_merge_size, v.in_channels * v.temporal_patch_size * v.patch_size**2
                blank, blank_ds = self.visual(x.new_zeros(m * m, row), torch.tensor([[1, m, m]], device=x.device))
                return x + 0.0 * sum((f.sum() for f in blank_ds), blank.sum()), None, ()
            return x, None, ()
        parts = [(p, g, tok, name) for p, g, tok, name in (
            (pixel_values, image_grid_thw, self.cfg.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, self.cfg.video_token_id, "video")) if p is not None]
        features, deepstack = self.visual(torch.cat([p for p, *_ in parts]), torch.cat([g for _, g, *_ in parts]))
        masks, start = [], 0
        for p, grid, tok, name in parts:
            mask = input_ids == tok
            n_tokens, n_features = int(mask.sum()), int(grid.prod(-1).sum()) // self.cfg.vision.spatial_merge_size**2
            if n_tokens != n_features:
                raise ValueError(
                    f"{n_tokens} {name}-pad tokens in input_ids but the {name}s give {n_features} features "
                    f"({name}_grid_thw {grid.tolist()} / {self.cfg.vision.spatial_merge_size}^2 each)")
            masks.append((mask, slice(start, start + n_features)))
            start += n_features
        visual_mask = functools.reduce(torch.logical_or, [mask for mask, _ in masks])
        # the tower's rows are images then videos; the pads of both, in sequence order, take them from `order`
        order = torch.empty(start, dtype=torch.long, device=x.device)
        for mask, rows in masks:
            order[mask[visual_mask]] = torch.arange(rows.start, rows.stop, device=x.device)
        x = x.masked_scatter(visual_mask[..., None], features[order].to(x.dtype))
        return x, visual_mask, [ds[order] for ds in deepstack]

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, position_ids=None,
                cache: KVCache | None = None, doc_ids=None, labels=None, return_hidden: bool = False,
                vision_always: bool = False, cache_position=None, pixel_values_videos=None, video_grid_thw=None,
                second_per_grid_ts=None):
        """input_ids (B, T) -> logits (B, T, vocab); the final hidden states (B, T, D) with return_hidden; with
        labels (B, T) (-100 = not trained), the summed next-token cross-entropy (fp32 scalar) instead.

        attention_mask (B, cached + T) marks real tokens (1) and pads (0); doc_ids (B, T) separates packed
        documents (pass their restarting position_ids too); cache continues a previous forward (cache_position:
        see TextModel.forward). pixel_values_videos / video_grid_thw are the video processor's; second_per_grid_ts
        (n_videos,) = temporal_patch_size / sampled fps places Qwen2.5-VL's video frames in time.
        """
        x, visual_mask, deepstack = self.embed(input_ids, pixel_values, image_grid_thw, vision_always,
                                               pixel_values_videos, video_grid_thw)
        if position_ids is None:
            position_ids = self.positions(input_ids, image_grid_thw, attention_mask, cache, video_grid_thw,
                                          second_per_grid_ts)
        h = self.model(x, position_ids, attention_mask, doc_ids, cache, visual_mask, deepstack, cache_position)
        if labels is not None:
            targets = labels[:, 1:]
            keep = targets != -100  # position t predicts token t + 1
            return chunked_cross_entropy(h[:, :-1][keep], self.lm_head, targets[keep])
        return h if return_hidden else self.lm_head(h)


def _ce_sum(h: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


def chunked_cross_entropy(h: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int = 2048):
    """Sum of cross-entropy of head(h) (h (N, D), head the lm_head: called as a module, so that an FSDP unit of
    its own gathers its weight) against targets (N,), `chunk` rows at a time.

    Only label positions come in, and each chunk's fp32 logits (chunk x vocab) are recomputed in backward
    (checkpoint) rather than kept: with a 152k vocabulary, all positions' fp32 logits would dwarf the model.
    """
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        part = (h[s : s + chunk], head, targets[s : s + chunk])
        total = total + (checkpoint(_ce_sum, *part, use_reentrant=False) if torch.is_grad_enabled() else _ce_sum(*part))
    return total


# ----------------------------------------------------------------------------------------------------------------
# what HF calls things: tensor names and config.json keys -> ours

# checkpoint prefix -> ours; the first that matches wins
NAME_RULES = [
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("visual.", "visual."),
    ("model.", "model."),
    ("lm_head.", "lm_head."),
]
# saving is the inverse: text-only and old-layout checkpoints use our names, the new layout nests these two
NEW_LAYOUT = {"model": "model.language_model", "visual": "model.visual"}
# transformers 5.23 still writes these in the old layout (conversion_mapping.py renames them back on save)
OLD_LAYOUT_TYPES = ("qwen2_vl", "qwen2_5_vl")


def our_name(hf_name: str) -> str | None:
    """The name of our parameter that an HF tensor fills, or None when no rule knows it."""
    for theirs, ours in NAME_RULES:
        if hf_name.startswith(theirs):
            return ours + hf_name[len(theirs):]
    return None


def hf_name(name: str, hf_config: dict) -> str:
    """The checkpoint name of our parameter `name` in the layout that hf_config implies."""
    if "vision_config" not in hf_config or hf_config.get("model_type") in OLD_LAYOUT_TYPES:
        return name
    head, rest = name.split(".", 1)
    return NEW_LAYOUT.get(head, head) + "." + rest



def size(d: dict, key: str, default=...) -> int:
    """A size from config.json: present (or defaulted) and a positive integer, checked before anything is built."""
    v = d.get(key, default)
    if v is ...:
        raise ValueError(f"config.json has no {key!r}")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"config.json: {key} = {v!r}, expected a positive integer")
    return v


def positive(v, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"config.json: {key} = {v!r}, expected a positive number")
    return v


def check_fits(t: TextConfig, limit: float = 2e12) -> None:
    """Heads that group, and a size some machine could hold (num_hidden_layers 1e9 would hang building it)."""
    if t.num_heads % t.num_kv_heads:
        raise ValueError(f"config.json: num_attention_heads {t.num_heads} is not a multiple of num_key_value_heads "
                         f"{t.num_kv_heads}")
    per_layer = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads) + 3 * t.hidden_size * \
        t.intermediate_size
    n = t.num_layers * per_layer + t.vocab_size * t.hidden_size * (1 if t.tie_word_embeddings else 2)
    if n > limit:
        raise ValueError(f"config.json describes a decoder of {n:.3g} parameters ({2 * n / 1e12:.3g} TB in bf16), "
                         "more than any machine holds: check its sizes")


def config_from_hf(hf: dict) -> ModelConfig:
    """Read an HF config.json (Qwen3 / Qwen2 LLMs, Qwen2.5-VL, Qwen3-VL, and the pairs `convert.py assemble`
    writes). This and vision_config_from_hf below are the only code that knows HF config keys."""
    model_type = hf.get("model_type", "")
    text = hf.get("text_config") or hf  # Qwen2.5-VL's own config.json keeps the text keys at the top level
    rope = text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ValueError(f"RoPE scaling {rope} is not implemented (only plain RoPE and M-RoPE)")
    is_vl = "vision_config" in hf
    # Qwen3 decoder (QK-norm, no biases) or Qwen2 (q/k/v biases); an assembled pair names it in text_config
    qwen3 = (text.get("model_type") or model_type).startswith("qwen3")
    # the 3-D position scheme is the vision family's: Qwen3-VL (a learned pos-embed table) interleaves the T/H/W
    # frequencies (transformers always does; 4.57 never reads the flag), Qwen2.5-VL gives each axis a section
    interleaved = is_vl and bool(hf["vision_config"].get("num_position_embeddings"))
    mrope = ()
    if is_vl:
        mrope = tuple(rope.get("mrope_section") or ((24, 20, 20) if interleaved else (16, 24, 24)))
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    n_heads = size(text, "num_attention_heads")
    text_cfg = TextConfig(
        vocab_size=size(text, "vocab_size"),
        hidden_size=size(text, "hidden_size"),
        intermediate_size=size(text, "intermediate_size"),
        num_layers=size(text, "num_hidden_layers"),
        num_heads=n_heads,
        num_kv_heads=size(text, "num_key_value_heads", n_heads),
        head_dim=size(text, "head_dim", None) if text.get("head_dim") else size(text, "hidden_size") // n_heads,
        rope_theta=float(positive(text.get("rope_theta") or rope.get("rope_theta") or hf.get("rope_theta"),
                                  "rope_theta")),
        rms_norm_eps=positive(text.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        max_position_embeddings=size(text, "max_position_embeddings", 32768),
        tie_word_embeddings=bool(tie),
        qkv_bias=not qwen3 or bool(text.get("attention_bias", False)),
        qk_norm=qwen3,
        mrope_section=mrope,
        mrope_interleaved=interleaved,
    )
    check_fits(text_cfg)
    if not is_vl:
        return ModelConfig(text=text_cfg)
    return ModelConfig(
        text=text_cfg,
        vision=vision_config_from_hf(hf["vision_config"], out_hidden_size=text_cfg.hidden_size),
        image_token_id=hf.get("image_token_id", text.get("image_token_id")),
        vision_start_token_id=hf.get("vision_start_token_id"),
        vision_end_token_id=hf.get("vision_end_token_id"),
        video_token_id=hf.get("video_token_id", text.get("video_token_id")),
        # 4 is transformers' Qwen2_5_VLVisionConfig default (the released checkpoints say 2)
        tokens_per_second=None if interleaved else hf["vision_config"].get("tokens_per_second", 4),
    )


def vision_config_from_hf(vision_config: dict, out_hidden_size: int | None = None) -> VisionConfig:
    """Read the `vision_config` dict of a Qwen2.5-VL or Qwen3-VL config.json. A learned position table
    (`num_position_embeddings`) marks the Qwen3-VL layout: LayerNorm, biased patch conv, GELU-tanh MLP,
    deepstack. Otherwise it is the Qwen2.5-VL layout: RMSNorm, bias-free conv, SiLU-gated MLP, windows.
    `out_hidden_size` overrides the merger width (for a new LLM)."""
    vc = vision_config
    if "embed_dim" in vc:
        raise ValueError("this looks like a Qwen2-VL vision config (has embed_dim); only Qwen2.5-VL and Qwen3-VL "
                         "vision towers are supported")
    learned_pos = bool(vc.get("num_position_embeddings"))
    act, want = vc.get("hidden_act"), "gelu_pytorch_tanh" if learned_pos else "silu"
    if act != want:
        raise ValueError(f"vision hidden_act {act!r}: expected {want!r} for this layout")
    return VisionConfig(
        depth=size(vc, "depth"),
        hidden_size=size(vc, "hidden_size"),
        num_heads=size(vc, "num_heads"),
        intermediate_size=size(vc, "intermediate_size"),
        out_hidden_size=out_hidden_size or size(vc, "out_hidden_size"),
        patch_size=size(vc, "patch_size"),
        temporal_patch_size=size(vc, "temporal_patch_size", 2),
        spatial_merge_size=size(vc, "spatial_merge_size", 2),
        in_channels=size(vc, "in_channels", vc.get("in_chans", 3)),  # old config.json files say in_chans
        norm="layer" if learned_pos else "rms",
        mlp="gelu_tanh" if learned_pos else "swiglu",
        patch_bias=learned_pos,
        num_position_embeddings=vc.get("num_position_embeddings", 0),
        # transformers' Qwen2.5-VL class defaults apply when an old config.json omits them
        window_size=0 if learned_pos else vc.get("window_size", 112),
        fullatt_block_indexes=() if learned_pos else tuple(vc.get("fullatt_block_indexes", (7, 15, 23, 31))),
        deepstack_indexes=tuple(vc.get("deepstack_visual_indexes", ())) if learned_pos else (),
        rope_theta=float((vc.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    )
