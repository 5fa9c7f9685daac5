"""Model directories on disk, in Hugging Face's layout: config.json, safetensors (one file, or shards and an
index), tokenizer and chat template, generation and preprocessor settings. Every step of the recipe reads and
writes these; nothing else in the project touches the files.

    model = from_pretrained(DIR, device="cuda", dtype=torch.bfloat16)   # strict: every tensor used, each checked
    model, tokenizer, image_cfg = load(DIR, "cpu", adapter=LORA_DIR)  # ready to sample from (sample.py, eval.py)
    save_state_dict(state, OUT, hf_config, max_shard_size="4GB")      # streamed, one tensor in memory at a time
    copy_model_files(SRC, OUT); stop_token_ids(DIR); read_chat_template(DIR)

Tensor names follow model.our_name / model.hf_name, so every layout loads: a text-only LLM (`model.*`,
`lm_head.*`), a VL checkpoint in the old layout (`model.*`, `visual.*`, Qwen2.5-VL) or the new one
(`model.language_model.*`, `model.visual.*`, Qwen3-VL).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from tokenizers import Tokenizer

import lora
import model as M
import pixels
from model import hf_name, our_name  # the HF name map lives beside the HF config reader


# ---- loading ----


def read_config(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json, not a model directory")
    try:
        return json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}/config.json is not JSON: {e}") from None


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


def load_state_dict(path, model: torch.nn.Module, device=None, dtype=None,
                    check_values: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a state dict with `model`'s names, strictly: every tensor of the file fills a
    parameter, every parameter is filled, shapes agree; otherwise one error lists every problem. Tensors are read
    one at a time (safe_open), converted and moved, so peak memory is one copy of the weights. A tied model takes
    its output matrix from the embeddings; a stored lm_head.weight must then equal them (checked, then dropped).
    A tensor whose dtype is not config.json's, or an integer one for a float parameter, is a problem too (from the
    headers: free); check_values also reads every value for NaN / inf (`python convert.py check DIR`: it reads
    the whole file, 1.1 s for a 0.6B bf16 checkpoint whose plain load takes 0.035 s)."""
    path = Path(path)
    files = checkpoint_files(path)
    expected = model.state_dict(keep_vars=True)
    tied = model.cfg.text.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    hf = read_config(path)
    declared = getattr(torch, str(hf.get("dtype") or hf.get("torch_dtype")), None)  # what the config says
    state, unexpected, misshaped, stored_head, bad = {}, [], [], None, []
    with contextlib.ExitStack() as stack:
        opened = {file: stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                  for file in set(files.values())}
        for key, file in sorted(files.items()):
            f, name = opened[file], our_name(key)
            if tied and name == "lm_head.weight":
                stored_head = f.get_tensor(key)
                continue
            if name not in expected:
                unexpected.append(key)
                continue
            shape, want = tuple(f.get_slice(key).get_shape()), tuple(expected[name].shape)
            if shape != want:
                misshaped.append(f"{key}: checkpoint {shape} vs model {want}")
                state[name] = None  # present, just wrong: not also reported missing
                continue
            t = f.get_tensor(key)
            if expected[name].is_floating_point() and not t.is_floating_point():
                bad.append(f"{key}: {t.dtype} where the model has a float parameter")
            elif isinstance(declared, torch.dtype) and t.dtype != declared:
                bad.append(f"{key}: {t.dtype}, but config.json declares {declared}")
            elif check_values and t.is_floating_point() and not torch.isfinite(t).all():
                bad.append(f"{key}: holds NaN or infinite values")
            state[name] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    missing = sorted(set(expected) - set(state))
    if missing or unexpected or misshaped or bad:
        lines = [f"{path}: checkpoint does not fit the model ({type(model).__name__} built from config.json)"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                             ("bad", bad)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {item}" for item in items]
        raise ValueError("\n".join(lines))
    if tied:
        embed = state["model.embed_tokens.weight"]
        if stored_head is not None and not torch.equal(stored_head.to(embed.device, embed.dtype), embed):
            raise ValueError(f"{path}: tie_word_embeddings is true but the stored lm_head.weight differs from "
                             "embed_tokens.weight; set tie_word_embeddings false in config.json to keep both")
        state["lm_head.weight"] = embed  # the model ties them again after loading
    return state


def read_model_config(path: Path) -> tuple[dict, M.ModelConfig]:
    """config.json and our config of a model dir; a config that is not a Qwen model's is one error naming it."""
    hf = read_config(path)
    try:
        return hf, M.config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{path}: not a Qwen model dir: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a Qwen model dir ({type(e).__name__}: {e} in config.json)") from None


def from_pretrained(path, device=None, dtype: torch.dtype | None = None) -> M.VLM:
    """A ready model for an HF directory (config.json + safetensors), built on the meta device and filled in
    place with the checkpoint's tensors (assign=True), so peak memory stays near one copy of the weights.
    dtype None keeps the stored dtype."""
    path = Path(path)
    with torch.device("meta"):
        model = M.VLM(read_model_config(path)[1])
    model.load_state_dict(load_state_dict(path, model, device=device, dtype=dtype), strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the parameter objects: tie again
    return model.eval()


ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}  # safetensors' names
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}


def read_tensor(file: Path, name: str, rows: int | None = None) -> torch.Tensor:
    """One tensor (or its first `rows` rows) read with plain file reads, not a memory map: only the tensor itself
    becomes resident, so a conversion holds about one tensor at a time, whatever the checkpoints' size."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        info = json.loads(f.read(n))[name]
        shape, dtype, (start, end) = info["shape"], ST_TORCH[info["dtype"]], info["data_offsets"]
        if rows is not None:  # rows are contiguous in a row-major tensor: read just the prefix
            shape, end = [rows] + shape[1:], start + rows * math.prod(shape[1:]) * dtype.itemsize
        f.seek(8 + n + start)
        data = bytearray(end - start)
        f.readinto(data)
    return torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)


# ---- saving ----

MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
               "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
               "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


@dataclass(frozen=True)
class Item:
    """One tensor to write: name, shape and dtype are known before its data is read (they go in the header)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(size: str | int) -> int:
    """500MB -> 500 * 10**6, 2GiB -> 2 * 2**30 (transformers' convention: GB decimal, GiB binary)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)(I?)B?", str(size).upper().replace(" ", ""))
    if not m:
        raise ValueError(f"shard size {size!r}: expected a byte count or e.g. 500MB, 4GB, 2GiB")
    number, unit, binary = m.groups()
    return int(float(number) * (1024 if binary else 1000) ** ("_KMGT".index(unit) if unit else 0))


def write_json(file: Path, obj) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, file)


def write_safetensors(file: Path, items: list[Item]) -> None:
    """A safetensors file written one tensor at a time (8-byte little-endian header length, the JSON header,
    then the raw tensors back to back), to a temporary name that is renamed when complete."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for it in items:
        header[it.name] = dict(dtype=ST_DTYPES[it.dtype], shape=list(it.shape),
                               data_offsets=[offset, offset + it.nbytes])
        offset += it.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for it in items:
            t = it.load().detach().to("cpu", it.dtype).contiguous()
            if tuple(t.shape) != it.shape:
                raise ValueError(f"{it.name}: the tensor is {tuple(t.shape)} but the header says {it.shape}")
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, no copy
    os.replace(tmp, file)


def write_checkpoint(out: Path, hf_config: dict, items: list[Item], max_shard_size: str | int) -> None:
    """model.safetensors, or shards of at most max_shard_size + model.safetensors.index.json as save_pretrained
    writes them, then config.json. Weight files of an earlier save that this one did not write are removed: a
    stale index would shadow a new single file."""
    limit, shards, size = parse_size(max_shard_size), [[]], 0
    for it in items:
        if shards[-1] and size + it.nbytes > limit:
            shards, size = shards + [[]], 0
        shards[-1].append(it)
        size += it.nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    out.mkdir(parents=True, exist_ok=True)
    for file, shard in zip(files, shards):
        write_safetensors(out / file, shard)
    if n > 1:
        weight_map = {it.name: file for file, shard in zip(files, shards) for it in shard}
        write_json(out / "model.safetensors.index.json",
                   {"metadata": {"total_size": sum(it.nbytes for it in items)}, "weight_map": weight_map})
        files.append("model.safetensors.index.json")
    for old in out.glob("model*.safetensors*"):
        if old.name not in files:
            old.unlink()
    write_json(out / "config.json", hf_config)


def save_state_dict(state: dict[str, torch.Tensor], out_dir, hf_config: dict,
                    max_shard_size: str | int = "4GB") -> None:
    """Write `state` (our names, as VLM.state_dict()) as an HF model dir: config.json = hf_config, each tensor
    under its name in hf_config's layout, in its own dtype, one at a time from any device (full tensors, not FSDP
    shards). The state must fit the model hf_config describes exactly; a tied lm_head is left out."""
    out = Path(out_dir)
    cfg = M.config_from_hf(hf_config)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in M.VLM(cfg).state_dict().items()}
    tied = cfg.text.tie_word_embeddings
    if tied:
        want.pop("lm_head.weight")
        head = state.get("lm_head.weight")
        if head is not None and not torch.equal(head, state["model.embed_tokens.weight"]):
            raise ValueError(f"{out}: config.json ties the embeddings but lm_head.weight differs from them")
    got = {k: tuple(v.shape) for k, v in state.items() if not (tied and k == "lm_head.weight")}
    problems = ([f"missing {k}" for k in want if k not in got] + [f"unexpected {k}" for k in got if k not in want]
                + [f"{k}: {got[k]} but the config makes {want[k]}" for k in got if k in want and got[k] != want[k]])
    if problems:
        raise ValueError(f"{out}: the state does not fit the model config.json describes:\n  " + "\n  ".join(problems))
    items = [Item(hf_name(k, hf_config), got[k], t.dtype, lambda t=t: t) for k, t in state.items() if k in want]
    write_checkpoint(out, hf_config, items, max_shard_size)


def copy_model_files(src_dir, out_dir) -> list[str]:
    """Copy the tokenizer, chat template, generation config and preprocessor files that src_dir has."""
    src, out = Path(src_dir), Path(out_dir)
    copied = [name for name in MODEL_FILES if (src / name).is_file()]
    out.mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copyfile(src / name, out / name)
    return copied


# ---- the model dir's other files: chat template, stop tokens ----


def read_chat_template(path) -> str:
    """The chat template of a model dir, where transformers looks: the processor's files, then the tokenizer's."""
    d = Path(path)
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        f = d / name
        if f.is_file():
            t = f.read_text() if name.endswith(".jinja") else json.loads(f.read_text()).get("chat_template")
            if isinstance(t, list):  # several named templates: the default one
                t = next((x["template"] for x in t if x.get("name") == "default"), None)
            if t:
                return t
    raise FileNotFoundError(f"{d}: no chat template in chat_template.jinja, chat_template.json or "
                            f"tokenizer_config.json; copy the tokenizer files of the LLM this model was made from")


def template_defaults(template: str) -> tuple[str, bool]:
    """(default system prompt, think) as a Qwen chat template decides them, read off its text rather than run.
    A literal `<|im_start|>system\\n...<|im_end|>` is the system turn it inserts when a conversation has none
    (Qwen2.5-VL: "You are a helpful assistant."; Qwen3 and Qwen3-VL: none). `reasoning_content` marks the Qwen3
    templates (hybrid and thinking) that render the last assistant turn with a <think> block, empty or not."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<>]+?)<\|im_end\|>", template)
    return (m.group(1) if m else ""), "reasoning_content" in template


# ---- ready for inference ----


def load(model_dir, device="cpu", dtype: torch.dtype | None = torch.bfloat16, adapter: str = "",
         max_pixels: int = 0):
    """(model, tokenizer, image_cfg or None for a text-only LLM) from a model dir, a LoRA adapter merged in;
    max_pixels > 0 lowers the images' pixel budget (fewer tokens per image). Errors name what is missing."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model dir not found: {path}")
    model = from_pretrained(path, device=device, dtype=dtype)  # errors name the dir and what is wrong
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (copy the tokenizer files of the base model here)")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    image_cfg = None
    if model.visual is not None:
        image_cfg = pixels.image_config_from_dir(path, patch_size=model.cfg.vision.patch_size)
        if max_pixels:
            image_cfg = replace(image_cfg, max_pixels=max_pixels, min_pixels=min(image_cfg.min_pixels, max_pixels))
        if tokenizer.token_to_id("<|image_pad|>") != model.cfg.image_token_id:
            raise ValueError(f"{path}: config.json's image_token_id {model.cfg.image_token_id} is not "
                             f"tokenizer.json's <|image_pad|> ({tokenizer.token_to_id('<|image_pad|>')})")
    if adapter:  # plain Linears again (W + B A * scale), which pack_for_cpu can pack
        lora.load_adapter(model, adapter)
        lora.merge_lora(model)
    pack_for_cpu(model)  # bf16 on CPU: the decoder's weights in oneDNN's layout, same numbers, faster decoding
    return model, tokenizer, image_cfg



def video_config(model_dir, cfg: M.ModelConfig, fps: float | None = None, max_frames: int | None = None,
                 max_pixels: int | None = None) -> pixels.VideoConfig | None:
    """The model dir's video settings (pixels.video_config_from_dir) with the --fps / --max-frames /
    --video-max-pixels overrides (None or 0: the dir's); None for a model that takes no video (a text-only LLM,
    or a config.json without video_token_id)."""
    if cfg.vision is None or cfg.video_token_id is None:
        return None
    v = pixels.video_config_from_dir(model_dir, patch_size=cfg.vision.patch_size)
    max_pixels = max_pixels or v.max_pixels
    return replace(v, fps=fps or v.fps, max_frames=max_frames or v.max_frames, max_pixels=max_pixels,
                   min_pixels=min(v.min_pixels, max_pixels))

class PackedLinear(nn.Module):
    """nn.Linear for CPU inference with its bf16 weight in oneDNN's blocked layout: the same products bit for bit
    (tests/test_sample.py), read ~3x faster for one token than by F.linear's row-major kernel (a Qwen3-0.6B-size
    decode step's matmuls: 21 ms instead of 63 on this project's 2-core EPYC). No autograd: sampling only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # 1: tuned for 1 row
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_for_cpu(model: M.VLM) -> int:
    """Swap the decoder's and lm_head's bf16 nn.Linears on CPU for PackedLinears, in place; the number swapped
    (0 where oneDNN has no bf16 or the model is not bf16 on CPU: fp32 stays exactly transformers' numbers).
    The vision tower is left alone: it runs once per prompt on many rows, where the layout gains nothing.
    A tied lm_head gets its own packed copy (the embedding keeps the original for lookups)."""
    w = model.lm_head.weight
    if w.device.type != "cpu" or w.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available() \
            or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 0
    swapped = 0
    for parent in [model, *model.model.modules()]:
        for name, child in parent.named_children():
            if type(child) is nn.Linear and (parent is not model or name == "lm_head"):
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    # The tensors left (embeddings, norms, the tower) still live in the checkpoint's file mapping, which now also
    # holds every page the packing read: owning copies of them lets the mapping go (0.6B: 2357 -> 1517 MiB).
    with torch.no_grad():
        for t in model.parameters():
            t.data = t.data.clone()
    return swapped


def stop_token_ids(model_dir) -> list[int]:
    """The end-of-sequence ids of generation_config.json and config.json (top level or text_config), in that
    order, without repeats: Qwen's chat models end a turn with <|im_end|> and a document with <|endoftext|>."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        file = Path(model_dir) / name
        if file.is_file():
            cfg = json.loads(file.read_text())
            for eos in (cfg.get("eos_token_id"), (cfg.get("text_config") or {}).get("eos_token_id")):
                ids += [eos] if isinstance(eos, int) else list(eos or [])
    return list(dict.fromkeys(ids))
