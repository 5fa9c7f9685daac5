"""LoRA (Hu et al. 2021) on our modules in plain PyTorch, reading and writing PEFT's adapter files:

    cfg = LoRAConfig(rank=16, alpha=32, parts=("llm",))
    apply_lora(model, cfg); init_lora(model, seed=0)   # only the A/B matrices train
    save_adapter(model, cfg, DIR)                       # adapter_config.json + adapter_model.safetensors, as PEFT
    load_adapter(model, DIR); merge_lora(model)         # PEFT's or ours; merged: plain nn.Linears again

A LoRALinear takes over the Linear it replaces at the same module path, *with the same weight and bias
Parameters*: `model.layers.0.self_attn.q_proj.weight` keeps its checkpoint name (the strict loaders and
save_state_dict see the base model unchanged) and the adapter adds `...q_proj.lora_A.weight` (r, in) and
`...q_proj.lora_B.weight` (out, r). In PEFT's adapter_model.safetensors these are the same names behind
"base_model.model." and transformers' module path (peft_name); its in-memory names (`lora_A.default.weight`,
`base_layer.weight`) never reach a file.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import model as M

# where each part's LoRA may go: the decoder layers and the vision blocks. Never the mergers (trained in full),
# embeddings, lm_head, or the patch conv (its forward reads the weight, it does not call a Linear).
PARTS = {"llm": "model.layers.", "vision": "visual.blocks."}
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the transformers model)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    parts: tuple[str, ...] = ("llm",)  # ("llm",), ("vision",) or both; vision's Linears: qkv, proj, mlp.*
    use_rslora: bool = False  # scale alpha / sqrt(rank) (rsLoRA, Kalajdzievski 2023) instead of alpha / rank


class LoRALinear(nn.Module):
    """y = x W^T + b + (dropout(x) A^T B^T) * scale, W and b frozen; PEFT's lora.Linear.forward."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base's own Parameters: nothing is copied, a meta model stays on meta
        self.register_parameter("bias", base.bias)
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, cfg.rank, **kw)  # (r, in); filled by init_lora / load_adapter
        self.lora_B = nn.Linear(cfg.rank, base.out_features, **kw)  # (out, r)
        nn.init.zeros_(self.lora_B.weight)  # so that a fresh layer adds nothing, even before init_lora
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        # PEFT LoraLayer.update_layer: scaling = lora_alpha / r, or / sqrt(r) with use_rslora
        self.scale = cfg.alpha / (math.sqrt(cfg.rank) if cfg.use_rslora else cfg.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = nn.functional.linear(x, self.weight, self.bias)
        return base + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def merged(self) -> nn.Linear:
        """The plain Linear with W + B A * scale; PEFT's get_delta_weight, also in fp32 for a low-precision W."""
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale  # (out, in)
            w = (self.weight.float() + delta).to(self.weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight, linear.bias = nn.Parameter(w, requires_grad=self.weight.requires_grad), self.bias
        return linear


def leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def set_lora_trainable(model: nn.Module) -> None:
    """Each LoRA'd Linear's weight and bias frozen, its A and B trained (again after train.set_trainable)."""
    for m in lora_modules(model).values():
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith("lora_"))


def apply_lora(model: nn.Module, cfg: LoRAConfig, paths: list[str] | None = None) -> list[str]:
    """Wrap the Linears named in cfg.targets inside cfg.parts (or exactly `paths`) in place; returns their paths.
    A target that matches nothing, a part with no target in it, a model with LoRA already: errors."""
    if lora_modules(model):
        raise ValueError("the model has LoRA layers already: merge_lora it first, or start from the base model")
    if paths is None:
        if not cfg.parts or set(cfg.parts) - set(PARTS):
            raise ValueError(f"LoRA parts {cfg.parts}: expected one or more of {tuple(PARTS)}")
        paths, problems = [], []
        for part in cfg.parts:
            linears = [n for n, m in model.named_modules() if n.startswith(PARTS[part]) and isinstance(m, nn.Linear)]
            hit = [n for n in linears if leaf(n) in cfg.targets]
            if not hit:
                have = sorted(set(map(leaf, linears)))
                problems.append(f"part {part!r} has no Linear named {list(cfg.targets)}, only {have}")
            paths += hit
        if unused := sorted(set(cfg.targets) - set(map(leaf, paths))):
            problems.append(f"targets {unused} match no Linear in parts {list(cfg.parts)}")
        if problems:
            raise ValueError("LoRA targets do not fit the model:\n  " + "\n  ".join(problems))
    for path in paths:
        replace(model, path, LoRALinear(model.get_submodule(path), cfg))
    set_lora_trainable(model)
    return paths


def lora_init_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fresh A and B for every LoRA layer as a CPU fp32 state dict, the same on every rank: A as PEFT (and
    nn.Linear) initialise it, kaiming_uniform_(a=sqrt(5)), B zeros, so a new adapter starts as the base model.
    For a model built on meta: add it to the base state before load_state_dict / set_model_state_dict."""
    g, state = torch.Generator().manual_seed(seed), {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = nn.init.kaiming_uniform_(
            torch.empty(m.lora_A.weight.shape), a=math.sqrt(5), generator=g)
        state[f"{name}.lora_B.weight"] = torch.zeros(m.lora_B.weight.shape)
    return state


def init_lora(model: nn.Module, seed: int = 0) -> None:
    """Fill A and B in place (after to_empty, or on a model built on a real device)."""
    with torch.no_grad():
        for name, t in lora_init_state(model, seed).items():
            model.get_parameter(name).copy_(t)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its weight and put plain Linears back: the state_dict has the base names only."""
    for path, m in lora_modules(model).items():
        replace(model, path, m.merged())
    return model


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(base, adapter) halves of a LoRA model's state dict (e.g. FSDP's gathered full state)."""
    is_lora = lambda k: k.endswith((".lora_A.weight", ".lora_B.weight"))  # noqa: E731
    return {k: v for k, v in state.items() if not is_lora(k)}, {k: v for k, v in state.items() if is_lora(k)}


# ---- PEFT's files ----


def peft_name(name: str, vl: bool) -> str:
    """PEFT's file name for our tensor: the module path in transformers' model behind "base_model.model.". PEFT
    saves in-memory names, and transformers 5 nests every VL class's decoder and tower in memory as
    model.language_model.* / model.visual.*, whatever layout its checkpoint files use (Qwen2.5-VL's are old)."""
    if vl:
        head, rest = name.split(".", 1)
        name = M.NEW_LAYOUT.get(head, head) + "." + rest
    return PEFT_PREFIX + name


def peft_targets(paths: list[str], vl: bool) -> list[str] | str:
    r"""target_modules: for an LLM the Linears' names (PEFT matches a name as a path suffix). In a VL model the
    names recur in the other part (Qwen2.5-VL's vision MLP has gate/up/down_proj too): a regex that PEFT
    full-matches against module paths, `model\.language_model\.layers\.\d+\.\w+\.(q_proj|v_proj)|...`, its
    names in a group at the end, where vLLM's is_regex_target_modules looks for them."""
    if not vl:
        return sorted(set(map(leaf, paths)))
    alternatives = []
    for prefix in PARTS.values():
        if leaves := sorted({leaf(p) for p in paths if p.startswith(prefix)}):
            where = re.escape(peft_name(prefix, vl)[len(PEFT_PREFIX):])  # model\.language_model\.layers\.
            alternatives.append(rf"{where}\d+\.\w+\.({'|'.join(leaves)})")
    return "|".join(alternatives)


def save_adapter(model: nn.Module, cfg: LoRAConfig, out_dir, base_model_name_or_path: str = "",
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors as PEFT's save_pretrained writes them (PeftModel.
    from_pretrained and vLLM's --lora-modules read them). `state`: full tensors, e.g. FSDP's gathered state."""
    vl = model.cfg.vision is not None
    _, adapter = split_state(model.state_dict() if state is None else state)
    if not adapter:
        raise ValueError("save_adapter: the model has no LoRA layers")
    paths, out = sorted({k.rsplit(".", 2)[0] for k in adapter}), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({peft_name(k, vl): v.detach().to("cpu").contiguous() for k, v in adapter.items()},
              out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
        target_modules=peft_targets(paths, vl), bias="none", fan_in_fan_out=False, modules_to_save=None,
        init_lora_weights=True, use_dora=False, lora_bias=False, rank_pattern={}, alpha_pattern={},
        layers_to_transform=None, layers_pattern=None, inference_mode=True, revision=None), indent=2) + "\n")


# adapter_config.json settings this file implements; anything else is refused rather than half-applied
SUPPORTED = {"peft_type": ("LORA",), "bias": ("none", None), "use_dora": (False, None), "lora_bias": (False, None),
             "fan_in_fan_out": (False, None), "modules_to_save": (None, []), "rank_pattern": ({}, None),
             "alpha_pattern": ({}, None), "layer_replication": (None,), "trainable_token_indices": (None,)}


def load_adapter(model: nn.Module, adapter_dir) -> LoRAConfig:
    """Apply a PEFT LoRA adapter (PEFT's save_pretrained or save_adapter) to `model`, strictly: every tensor
    is the A or B of a Linear in the decoder layers or vision blocks, each such Linear gets both, shapes agree;
    otherwise one error lists every problem (and the model is left as it was). The file decides which Linears
    get LoRA; target_modules is not needed. Returns the config read."""
    path = Path(adapter_dir)
    conf = json.loads((path / "adapter_config.json").read_text())
    bad = [f"{k}={conf[k]!r}" for k, ok in SUPPORTED.items() if k in conf and conf[k] not in ok]
    if bad:
        raise ValueError(f"{path}: adapter_config.json asks for what lora.py does not implement: {', '.join(bad)}")
    modules, ours, problems = dict(model.named_modules()), {}, []
    for key, t in load_file(path / "adapter_model.safetensors").items():
        name = M.our_name(key[len(PEFT_PREFIX):]) if key.startswith(PEFT_PREFIX) else None
        m = re.fullmatch(r"(.+)\.lora_[AB]\.weight", name or "")
        if m and m[1].startswith(tuple(PARTS.values())) and isinstance(modules.get(m[1]), nn.Linear):
            ours[name] = t
        else:
            problems.append(f"unexpected {key}: not lora_A/B of a Linear in the decoder layers or vision blocks")
    paths, r = sorted({n.rsplit(".", 2)[0] for n in ours}), conf["r"]
    for p in paths:
        for name, want in ((f"{p}.lora_A.weight", (r, modules[p].in_features)),
                           (f"{p}.lora_B.weight", (modules[p].out_features, r))):
            if name not in ours:
                problems.append(f"missing {name}")
            elif tuple(ours[name].shape) != want:
                problems.append(f"{name}: adapter {tuple(ours[name].shape)} vs {want} for r={r}")
    if problems or not ours:
        raise ValueError(f"{path}: the adapter does not fit the model\n  " + "\n  ".join(problems or ["no tensors"]))
    cfg = LoRAConfig(rank=r, alpha=conf["lora_alpha"], dropout=conf.get("lora_dropout") or 0.0,
                     targets=tuple(sorted(set(map(leaf, paths)))),
                     parts=tuple(part for part, pre in PARTS.items() if any(p.startswith(pre) for p in paths)),
                     use_rslora=bool(conf.get("use_rslora")))
    apply_lora(model, cfg, paths)
    with torch.no_grad():
        for name, t in ours.items():
            model.get_parameter(name).copy_(t)
    return cfg
