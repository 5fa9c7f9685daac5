"""The 2x2 patch merger: m*m neighbouring vision patches -> one LLM token.

Two checkpoint layouts of the same math (norm -> concat m*m patches -> Linear -> GELU(erf) -> Linear):
  kind "rms"   (Qwen2.5-VL): `ln_q` RMSNorm per patch, then `mlp.0` / `mlp.1` (GELU) / `mlp.2`.
  kind "layer" (Qwen3-VL):   `norm` LayerNorm, then `linear_fc1` / `act_fn` / `linear_fc2`.
Qwen3-VL's deepstack mergers are the "layer" kind with the norm applied *after* the concat
(`postshuffle_norm`), over m*m*in_dim features.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class MergerConfig:
    in_dim: int                     # vision hidden width (per patch)
    out_dim: int                    # LLM hidden width
    merge_size: int = 2             # m: an m x m block of patches becomes one token
    kind: str = "layer"             # "rms" (Qwen2.5-VL names) | "layer" (Qwen3-VL names)
    postshuffle_norm: bool = False  # normalise after the concat (deepstack) instead of per patch


class RMSNorm(nn.Module):
    """Qwen RMSNorm: normalise in fp32, cast back to the input dtype, *then* scale (pitfall 3)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    """Vision norms use eps 1e-6, hard-coded in transformers (not read from the config)."""
    if kind == "rms":
        return RMSNorm(dim, eps=1e-6)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=1e-6)
    raise ValueError(f"unknown norm kind {kind!r}: expected 'rms' or 'layer'")


class PatchMerger(nn.Module):
    def __init__(self, cfg: MergerConfig):
        super().__init__()
        self.cfg = cfg
        self.wide = cfg.in_dim * cfg.merge_size**2
        norm = make_norm(cfg.kind, self.wide if cfg.postshuffle_norm else cfg.in_dim)
        fc1, act, fc2 = nn.Linear(self.wide, self.wide), nn.GELU(), nn.Linear(self.wide, cfg.out_dim)
        # Attribute names are the checkpoint's, so state dicts load without a rename table.
        if cfg.kind == "rms":
            self.ln_q = norm
            self.mlp = nn.Sequential(fc1, act, fc2)
        else:
            self.norm, self.linear_fc1, self.act_fn, self.linear_fc2 = norm, fc1, act, fc2

    def layers(self) -> tuple[nn.Module, nn.Linear, nn.Module, nn.Linear]:
        if self.cfg.kind == "rms":
            return self.ln_q, self.mlp[0], self.mlp[1], self.mlp[2]
        return self.norm, self.linear_fc1, self.act_fn, self.linear_fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, in_dim), rows in m x m block order (each run of m*m rows is one block)
        norm, fc1, act, fc2 = self.layers()
        if self.cfg.postshuffle_norm:
            x = norm(x.view(-1, self.wide))       # (N, in) -> (N/m^2, m^2*in), then norm
        else:
            x = norm(x).view(-1, self.wide)       # norm per patch, then (N/m^2, m^2*in)
        return fc2(act(fc1(x)))                   # (N/m^2, out_dim)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh init for a merger whose output feeds a new LLM (out_dim = its hidden size).

        Linear weights ~ trunc-normal(0, 0.02) cut at 2 std: 0.02 is the `initializer_range` of every Qwen
        config, so a fresh merger starts where transformers' own init would put it, and the cut keeps rare
        large weights from producing outlier tokens before training has shaped them. Biases are zero and
        norms identity (weight 1, bias 0) so the first steps see the vision features unchanged by scale.
        """
        norm, fc1, _, fc2 = self.layers()
        for lin in (fc1, fc2):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(lin.bias)
        nn.init.ones_(norm.weight)
        if getattr(norm, "bias", None) is not None:
            nn.init.zeros_(norm.bias)
