"""Making model dirs out of model dirs (reading and writing them is weights.py's):

    python convert.py assemble --vision DIR --llm DIR --out DIR [--merger-init fresh|copy] [--dtype bfloat16]
    python convert.py merge-lora --model BASE --adapter DIR --out DIR    # a LoRA adapter folded into its base
    python convert.py check --model DIR                                  # every tensor read and checked

`assemble` takes a VL model's vision tower (Qwen2.5-VL or Qwen3-VL), the whole of a Qwen3 (or Qwen2) LLM and a
merger (fresh, or the donor's where it fits), streamed one tensor at a time into a new HF-layout dir that
transformers can load where it has a class for the pair; every input tensor is used or dropped on purpose.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

import cli
import lora
import model as M
import pixels
import weights
from merger import PatchMerger
from model import hf_name, our_name  # the HF name map lives beside the HF config reader

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
    donor_hf, llm_hf = weights.read_config(vdir), weights.read_config(ldir)
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
    for name, file in weights.checkpoint_files(path).items():
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


def plan(cfg: M.ModelConfig, hf: dict, sources: dict,
         a: AssembleArgs) -> tuple[list[weights.Item], dict, list[str]]:
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
            load, source = (lambda s=src, r=rows: weights.read_tensor(s[0], s[1], r)), f"{role}:{src[1]}"
        items.append(weights.Item(hf_name(name, hf), shape, dtype, load))
        origins[items[-1].name] = (origin, source)
    dropped = []
    for role, tensors in sources.items():
        for name, (file, src_name, _) in tensors.items():
            if (role, name) in used:
                continue
            if role == "llm" and name == "lm_head.weight" and tied:
                embed = sources["llm"].get("model.embed_tokens.weight")
                if embed and not torch.equal(weights.read_tensor(file, src_name), weights.read_tensor(embed[0], embed[1])):
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
    check_tokenizers(vdir, ldir, [i for i in (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                                             cfg.vision_end_token_id) if i is not None],
                     cfg.text.vocab_size)
    image = pixels.image_config_from_dir(vdir, patch_size=cfg.vision.patch_size)
    if (image.merge_size, image.temporal_patch_size) != (cfg.vision.spatial_merge_size, cfg.vision.temporal_patch_size):
        raise ValueError(f"{vdir}/preprocessor_config.json does not match its vision tower's merge/temporal size")
    sources = {"vision": checkpoint_tensors(vdir), "llm": checkpoint_tensors(ldir)}
    items, origins, dropped = plan(cfg, hf, sources, a)
    weights.write_checkpoint(out, hf, items, a.max_shard_size)  # one tensor in memory at a time
    weights.copy_model_files(ldir, out)  # the LLM's tokenizer, chat template and generation config
    pixels.save_image_config(image, out)  # the vision donor's image preprocessing
    # and its video preprocessing, as AutoVideoProcessor reads it from the donor (Qwen3-VL ships a
    # video_preprocessor_config.json; Qwen2.5-VL's comes from its preprocessor_config.json), written out whole
    pixels.save_video_config(pixels.video_config_from_dir(vdir, patch_size=cfg.vision.patch_size), out)
    weights.write_json(out / "assemble.json", {"args": dataclasses.asdict(a), "tensors": origins, "dropped": dropped})
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
    model = weights.from_pretrained(model_dir)  # the stored dtype; merge_lora adds B A in fp32
    lora.load_adapter(model, adapter_dir)
    lora.merge_lora(model)
    weights.save_state_dict(model.state_dict(), out_dir, weights.read_config(Path(model_dir)), max_shard_size)
    weights.copy_model_files(model_dir, out_dir)


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
                model = M.VLM(weights.read_model_config(Path(a.model))[1])
            n = len(weights.load_state_dict(a.model, model, check_values=True))
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
