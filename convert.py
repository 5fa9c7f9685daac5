"""Hugging Face checkpoints <-> our modules: the safetensors name map, strict loading and saving.

Our module tree mirrors the checkpoints: `model.*` is the decoder, `visual.*` the vision tower (with its
merger), `lm_head` the output matrix. Every layout we meet maps onto it with a few prefix rules:
  text-only LLM (Qwen3ForCausalLM):        model.*                  lm_head.*
  VL, old layout (Qwen2.5-VL on the Hub):  model.*      visual.*    lm_head.*
  VL, new layout (Qwen3-VL, transformers 5): model.language_model.*  model.visual.*  lm_head.*
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

# first match wins; the right side is our name's prefix
NAME_RULES = [
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^visual\."), "visual."),
    (re.compile(r"^model\."), "model."),
    (re.compile(r"^lm_head\."), "lm_head."),
]


def our_name(hf_name: str) -> str | None:
    """The name of our parameter that an HF tensor fills, or None when no rule knows it."""
    for pattern, prefix in NAME_RULES:
        if pattern.match(hf_name):
            return pattern.sub(prefix, hf_name, count=1)
    return None


def checkpoint_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it, for a sharded (index) or single-file checkpoint."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_state_dict(path, model: torch.nn.Module, device=None, dtype=None) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a state dict with `model`'s names, strictly: every tensor of the file fills a
    parameter, every parameter is filled, shapes agree; otherwise one error lists every problem.

    Tensors are read one at a time (safe_open), converted and moved, so peak memory is one copy of the
    weights. A tied model takes its output matrix from the embeddings; a stored lm_head.weight must then equal
    them (it is checked and dropped).
    """
    path = Path(path)
    files = checkpoint_files(path)
    expected = {name: p for name, p in model.state_dict(keep_vars=True).items()}
    tied = getattr(model.cfg.text, "tie_word_embeddings", False)
    if tied:
        expected.pop("lm_head.weight")

    state, unexpected, misshaped, dropped = {}, [], [], None
    handles = {}
    try:
        for hf_name, file in sorted(files.items()):
            f = handles.get(file) or handles.setdefault(file, safe_open(file, framework="pt", device="cpu"))
            name = our_name(hf_name)
            if tied and name == "lm_head.weight":
                dropped = f.get_tensor(hf_name)
                continue
            if name not in expected:
                unexpected.append(hf_name)
                continue
            shape = tuple(f.get_slice(hf_name).get_shape())
            if shape != tuple(expected[name].shape):
                misshaped.append(f"{hf_name}: checkpoint {shape} vs model {tuple(expected[name].shape)}")
                state[name] = None  # present, just wrong: not also reported missing
                continue
            t = f.get_tensor(hf_name)
            state[name] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    finally:
        handles.clear()
    missing = sorted(set(expected) - set(state))
    if missing or unexpected or misshaped:
        lines = [f"{path}: checkpoint does not fit the model ({type(model).__name__} built from config.json)"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {item}" for item in items]
        raise ValueError("\n".join(lines))
    if dropped is not None:
        embed = state["model.embed_tokens.weight"]
        if not torch.equal(dropped.to(embed.device, embed.dtype), embed):
            raise ValueError(
                f"{path}: tie_word_embeddings is true but the stored lm_head.weight differs from "
                "embed_tokens.weight; set tie_word_embeddings false in config.json to keep both"
            )
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # the model ties them again after loading
    return state
