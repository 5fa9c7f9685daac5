"""Hugging Face checkpoints <-> our modules: the safetensors name map, strict loading, saving, and assembling
a new VLM from a VL model's vision tower and a Qwen3 LLM:

    model = from_pretrained(DIR, device="cuda", dtype=torch.bfloat16)   # any model dir: an LLM, a VLM
    python convert.py assemble --vision DIR --llm DIR --out DIR [--merger-init fresh|copy] [--dtype bfloat16]
    python convert.py merge-lora --model BASE --adapter DIR --out DIR    # a LoRA adapter folded into its base
    python convert.py check --model DIR                                  # every tensor read and checked

Our module tree mirrors the checkpoints: `model.*` is the decoder, `visual.*` the vision tower (with its
merger), `lm_head` the output matrix. Every layout we meet maps onto it with a few prefix rules:
  text-only LLM (Qwen3ForCausalLM):          model.*                                lm_head.*
  VL, old layout (Qwen2.5-VL on the Hub):    model.*                 visual.*       lm_head.*
  VL, new layout (Qwen3-VL, transformers 5): model.language_model.*  model.visual.* lm_head.*
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

import cli
import lora
import model as M
import pixels
from merger import PatchMerger
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
               "generation_config.json", "preprocessor_config.json")


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


# ---- assembling: a VL model's vision tower + a Qwen3 (or Qwen2) LLM + a merger -> a new VL model dir ----


@dataclass
class AssembleArgs:
    vision: str                  # a Qwen2.5-VL or Qwen3-VL model dir: its vision tower (and merger, with copy)
    llm: str                     # a text-only Qwen3 / Qwen2 model dir: the decoder, tokenizer, generation config
    out: str                     # the new model dir: new or empty, unless --force
    merger_init: str = "fresh"   # fresh | copy: the donor's merger tensors that fit, the last Linear's rows cropped
    dtype: str = "bfloat16"      # of every output tensor
    max_shard_size: str = "4GB"  # of the output's safetensors files
    seed: int = 0                # of the fresh merger init
    force: bool = False          # write into a non-empty --out


# the decoder each VL family's transformers class holds; any other pair has no transformers class
FAMILY_DECODER = {"qwen3_vl": "qwen3", "qwen2_5_vl": "qwen2"}
ARCHITECTURES = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
VISION_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
MERGERS = ("visual.merger.", "visual.deepstack_merger_list.")
LAST_LINEAR = ("linear_fc2.weight", "linear_fc2.bias", "mlp.2.weight", "mlp.2.bias")  # PatchMerger's fc2, both names
LAYER = re.compile(r"((?:layers|blocks|deepstack_merger_list)\.)(\d+)\.")


def assembled_config(vdir: Path, ldir: Path, dtype: str) -> dict:
    """config.json of the new model: the donor's vision config (merger width = the LLM's hidden size) and vision
    token ids; a text config written from the LLM's TextConfig, with the donor family's M-RoPE sections.
    A pair that transformers has a class for gets that class's model_type. Any other pair gets a model_type
    transformers does not know, so it refuses the checkpoint instead of loading it into a class that drops
    QK-norm (Qwen2.5-VL's decoder has none) or biases."""
    donor_hf, llm_hf = read_config(vdir), read_config(ldir)
    if "vision_config" not in donor_hf:
        raise ValueError(f"{vdir}/config.json has no vision_config: no vision tower to take (--vision wants a "
                         "Qwen2.5-VL or Qwen3-VL model)")
    decoder = llm_hf.get("model_type")
    if decoder not in FAMILY_DECODER.values() or "vision_config" in llm_hf:
        raise ValueError(f"{ldir}/config.json: model_type {decoder!r}; --llm wants a text-only Qwen3 or Qwen2 model")
    donor, llm = M.config_from_hf(donor_hf), M.config_from_hf(llm_hf).text
    family = "qwen3_vl" if donor.vision.num_position_embeddings else "qwen2_5_vl"  # as the tower is built
    section = donor.text.mrope_section
    if sum(section) != llm.head_dim // 2:
        raise ValueError(f"the {family} M-RoPE sections {section} cover {sum(section)} frequencies, the LLM's "
                         f"head_dim {llm.head_dim} has {llm.head_dim // 2}")
    text = dataclasses.replace(llm, mrope_section=section, mrope_interleaved=donor.text.mrope_interleaved)
    native = FAMILY_DECODER[family] == decoder
    rope = dict(rope_type="default", rope_theta=text.rope_theta, mrope_section=list(section))
    rope |= {"mrope_interleaved": True} if text.mrope_interleaved else {}  # only Qwen3-VL's config knows the key
    text_config = dict(
        model_type=f"{family}_text" if native else decoder, vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads, num_key_value_heads=text.num_kv_heads, head_dim=text.head_dim,
        hidden_act="silu", attention_bias=text.qkv_bias, rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings, tie_word_embeddings=text.tie_word_embeddings,
        rope_parameters=rope)
    hf = dict(**({"architectures": [ARCHITECTURES[family]]} if native else {}),
              model_type=family if native else f"{family}_{decoder}",
              **{k: donor_hf[k] for k in VISION_TOKEN_KEYS if k in donor_hf},
              tie_word_embeddings=text.tie_word_embeddings, dtype=dtype, text_config=text_config,
              vision_config={**donor_hf["vision_config"], "out_hidden_size": text.hidden_size})
    cfg = M.config_from_hf(hf)  # the one reader must read back exactly what was meant
    if cfg.text != text or cfg.vision != dataclasses.replace(donor.vision, out_hidden_size=text.hidden_size):
        raise RuntimeError("bug: the config.json written does not read back to the model assembled")
    return hf


def check_tokenizers(vision_dir: Path, llm_dir: Path, vision_ids: list[int], vocab_size: int) -> None:
    """The new model speaks the LLM's tokenizer: every special token of the donor's (and each vision token id its
    config names) must have the same id there, and the LLM's embedding must have a row for every id."""
    from tokenizers import Tokenizer

    for d in (vision_dir, llm_dir):
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{d}: no tokenizer.json, so its special-token ids cannot be checked")
    donor, llm = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (vision_dir, llm_dir))
    specials = {i: t.content for i, t in donor.get_added_tokens_decoder().items() if t.special}
    specials |= {i: donor.id_to_token(i) for i in vision_ids}
    bad = [f"{tok!r}: id {i} in {vision_dir}, {llm.token_to_id(tok) if tok else None} in {llm_dir}"
           for i, tok in sorted(specials.items()) if tok is None or llm.token_to_id(tok) != i]
    if bad:
        raise ValueError("the two tokenizers disagree on special tokens (the new model keeps the LLM's tokenizer "
                         "and the donor's vision token ids):\n  " + "\n  ".join(bad))
    top = max(llm.get_vocab(with_added_tokens=True).values())
    if top >= vocab_size:
        raise ValueError(f"{llm_dir}: the tokenizer has ids up to {top} but vocab_size is {vocab_size}: "
                         "the embedding cannot cover it")


def checkpoint_tensors(path: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """our name (or "?name" when no rule knows it) -> (file, checkpoint name, shape), from the headers alone."""
    by_file, out = defaultdict(list), {}
    for name, file in checkpoint_files(path).items():
        by_file[file].append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            out |= {our_name(n) or f"?{n}": (file, n, tuple(f.get_slice(n).get_shape())) for n in names}
    return out


def fresh_mergers(visual: torch.nn.Module, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The merger and deepstack mergers, freshly initialised (PatchMerger.init_weights) from `seed`."""
    mergers = {"visual.merger.": visual.merger}
    mergers |= {f"visual.deepstack_merger_list.{i}.": m for i, m in enumerate(visual.deepstack_merger_list)}
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prefix, meta in mergers.items():
            merger = PatchMerger(meta.cfg)
            merger.init_weights()
            out |= {prefix + k: v.to(dtype) for k, v in merger.state_dict().items()}
    return out


def plan(cfg: M.ModelConfig, hf: dict, sources: dict, a: AssembleArgs) -> tuple[list[Item], dict, list[str]]:
    """Every output tensor as an Item (read when written) with its origin; every input tensor is used or dropped
    on purpose (the donor's LLM and unused merger; a tied LLM's stored lm_head, if it equals the embeddings).
    Anything missing, mis-shaped or unplaceable is one error that lists it all."""
    dtype = getattr(torch, a.dtype)
    with torch.device("meta"):
        target = M.VLM(cfg)
    fresh = fresh_mergers(target.visual, a.seed, dtype)
    tied = cfg.text.tie_word_embeddings
    items, origins, used, problems = [], {}, set(), []
    for name, p in target.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        shape, role = tuple(p.shape), "vision" if name.startswith("visual.") else "llm"
        src = sources[role].get(name)  # (file, checkpoint name, shape) or None
        origin, rows = role, None
        if name.startswith(MERGERS):
            have = src[2] if src and a.merger_init == "copy" else None
            if have and name.endswith(LAST_LINEAR) and have[0] > shape[0] and have[1:] == shape[1:]:
                origin, rows = "cropped", shape[0]  # a narrower LLM: the first rows of the last Linear
            elif have != shape:
                origin = "fresh"
        elif src is None or src[2] != shape:
            problems.append(f"{role} {src[1]}: shape {src[2]}, the model needs {shape}" if src
                            else f"{role} {name}: missing")
            continue
        if origin == "fresh":
            load, source = (lambda t=fresh[name]: t), f"fresh (seed {a.seed})"
        else:
            used.add((role, name))
            load, source = (lambda s=src, r=rows: read_tensor(s[0], s[1], r)), f"{role}:{src[1]}"
        items.append(Item(hf_name(name, hf), shape, dtype, load))
        origins[items[-1].name] = (origin, source)
    dropped = []
    for role, tensors in sources.items():
        for name, (file, src_name, _) in tensors.items():
            if (role, name) in used:
                continue
            if role == "llm" and name == "lm_head.weight" and tied:
                embed = sources["llm"].get("model.embed_tokens.weight")
                if embed and not torch.equal(read_tensor(file, src_name), read_tensor(embed[0], embed[1])):
                    problems.append(f"llm {src_name}: tie_word_embeddings is true but it differs from embed_tokens")
            elif role == "llm" or not name.startswith(("model.", "lm_head.") + MERGERS):
                problems.append(f"{role} {src_name}: unexpected, no place for it in the new model")
            dropped.append(f"{role}:{src_name}")
    if problems:
        raise ValueError("the --vision / --llm checkpoints do not fit the model assembled:\n  " + "\n  ".join(problems))
    return items, origins, dropped


def assemble(a: AssembleArgs) -> dict[str, tuple[str, str]]:
    """Write the new model dir; return {output tensor: (origin, source)}, origin vision | llm | fresh | cropped."""
    vdir, ldir, out = Path(a.vision), Path(a.llm), Path(a.out)
    dtype = getattr(torch, a.dtype, None)
    if a.merger_init not in ("fresh", "copy") or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"--merger-init {a.merger_init!r} / --dtype {a.dtype!r}: expected fresh|copy, a float dtype")
    if out.resolve() in (vdir.resolve(), ldir.resolve()):
        raise ValueError(f"--out {out} is one of the inputs")
    if out.exists() and any(out.iterdir()) and not a.force:
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out, or --force to write into it")
    hf = assembled_config(vdir, ldir, a.dtype)
    cfg = M.config_from_hf(hf)
    check_tokenizers(vdir, ldir, [cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id],
                     cfg.text.vocab_size)
    image = pixels.image_config_from_dir(vdir, patch_size=cfg.vision.patch_size)
    if (image.merge_size, image.temporal_patch_size) != (cfg.vision.spatial_merge_size, cfg.vision.temporal_patch_size):
        raise ValueError(f"{vdir}/preprocessor_config.json does not match its vision tower's merge/temporal size")
    sources = {"vision": checkpoint_tensors(vdir), "llm": checkpoint_tensors(ldir)}
    items, origins, dropped = plan(cfg, hf, sources, a)
    write_checkpoint(out, hf, items, a.max_shard_size)  # one tensor in memory at a time
    copy_model_files(ldir, out)  # the LLM's tokenizer, chat template and generation config
    pixels.save_image_config(image, out)  # the vision donor's image preprocessing
    write_json(out / "assemble.json", {"args": dataclasses.asdict(a), "tensors": origins, "dropped": dropped})
    print(report(origins, {it.name: math.prod(it.shape) for it in items}, len(dropped)))
    return origins


def report(origins: dict[str, tuple[str, str]], numels: dict[str, int], n_dropped: int) -> str:
    """Where each output tensor came from (a layer or block index folded into {first..last}), then the
    parameter counts per part."""
    groups = defaultdict(list)  # (name, origin, source) with "#" for the index -> the output tensors
    parts = defaultdict(lambda: defaultdict(int))  # part -> origin -> params
    for name, (origin, source) in origins.items():
        groups[LAYER.sub(r"\1#.", name), origin, LAYER.sub(r"\1#.", source)].append(name)
        parts["merger" if "merger" in name else "vision" if "visual." in name else "llm"][origin] += numels[name]
    rows = []
    for (name, origin, source), names in groups.items():
        idx = {int(m[2]) for n in names for m in LAYER.finditer(n)}
        span = "{" + (f"{min(idx)}..{max(idx)}" if idx else "") + "}"
        params = sum(numels[n] for n in names)
        rows.append((name.replace("#", span), origin, len(names), params, source.replace("#", span)))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'output tensor':<{w}}  {'origin':<7} {'count':>5} {'params':>13}  source"]
    lines += [f"{name:<{w}}  {origin:<7} {n:>5} {params:>13,}  {source}" for name, origin, n, params, source in rows]
    lines += ["", f"{'part':<7} {'params':>13}  from"]
    for part, by_origin in parts.items():
        what = ", ".join(f"{origin} {params:,}" for origin, params in by_origin.items())
        lines.append(f"{part:<7} {sum(by_origin.values()):>13,}  {what}")
    lines.append(f"{'total':<7} {sum(numels.values()):>13,}  ({n_dropped} input tensors dropped: see assemble.json)")
    return "\n".join(lines)


def merge_lora_dir(model_dir, adapter_dir, out_dir, max_shard_size: str = "4GB") -> None:
    """`python convert.py merge-lora --model BASE --adapter DIR --out DIR`: the base with a PEFT LoRA adapter
    folded in (lora.load_adapter, lora.merge_lora), a plain HF model dir in the base's dtype and layout."""
    model = from_pretrained(model_dir)  # the stored dtype; merge_lora adds B A in fp32
    lora.load_adapter(model, adapter_dir)
    lora.merge_lora(model)
    save_state_dict(model.state_dict(), out_dir, read_config(Path(model_dir)), max_shard_size)
    copy_model_files(model_dir, out_dir)


@dataclass
class MergeArgs:
    model: str  # the base model dir the adapter was trained on (train.py --lora-rank's --out holds both)
    adapter: str  # a PEFT LoRA adapter dir: adapter_config.json + adapter_model.safetensors
    out: str  # the merged model dir: new or empty, unless --force
    max_shard_size: str = "4GB"  # of the output's safetensors files
    force: bool = False  # write into a non-empty --out


@dataclass
class CheckArgs:
    model: str  # a model dir: every tensor read, its name, shape, dtype and values (NaN / inf) checked


COMMANDS = {"assemble": (AssembleArgs, "a new VLM: a VL model's vision tower + a Qwen3 LLM + a merger"),
            "merge-lora": (MergeArgs, "a PEFT LoRA adapter folded into its base: a plain HF model dir"),
            "check": (CheckArgs, "read a whole model dir: every problem of its config and tensors, by name")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.Formatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (settings, about) in COMMANDS.items():
        cli.add_flags(commands.add_parser(name, help=about, description=about, formatter_class=cli.Formatter),
                      settings)
    args = parser.parse_args(argv)
    a = cli.settings(COMMANDS[args.command][0], args, parser)
    try:
        if args.command == "assemble":
            assemble(a)
        elif args.command == "check":
            with torch.device("meta"):
                model = M.VLM(read_model_config(Path(a.model))[1])
            n = len(load_state_dict(a.model, model, check_values=True))
            print(f"{a.model}: {n} tensors, each where the model expects it, in config.json's dtype, all finite")
        else:
            if Path(a.out).exists() and any(Path(a.out).iterdir()) and not a.force:
                raise FileExistsError(f"{a.out} exists and is not empty: choose a new --out, or --force")
            merge_lora_dir(a.model, a.adapter, a.out, a.max_shard_size)
            print(f"saved {a.out}: {a.model} with the adapter {a.adapter} merged in")
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
