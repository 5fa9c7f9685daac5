"""Data: LLaVA / ms-swift datasets to checked, rendered, packed batches (pixels are pixels.py's).

In order: the model dir's side (tokenizer, chat template, image settings) -> reading datasets and their problems
-> rendering a sample as its chat template would, with labels -> the check (the linter's core) -> tensors,
packing, the loader -> the linter's command line.

For train.py (`python data.py FILE... --model DIR` is its first four steps, as a linter):
    cfg = DataConfig(max_length=4096, ...)                      # the user's data choices, one flag each
    chat = load_chat(model_dir, cfg)                            # what the model dir decides: tokens, template
    samples, problems = load_samples(files, cfg.data_root)      # JSON and structure
    samples, summary, more = check_dataset(samples, chat, cfg)  # images decoded, samples measured, valid kept
    problems += more                                            # on any problem stop, unless told to skip them
    loader = Loader(samples, chat, cfg, rank, world_size, seed, num_workers)   # loader.efficiency(epoch)
    for batch in loader.batches(epoch, start=offset):           # VLM.forward's kwargs + labels
        loss = F.cross_entropy(logits[:, :-1] ..., batch["labels"][:, 1:] ..., ignore_index=-100)
        offset = loader.offset                                  # save it: batches(epoch, start=offset) resumes
"""

import bisect
import functools
import json
import multiprocessing
import re
import sys
import typing
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

import cli
import model
import pixels
import weights


# ---- the model dir's side: tokenizer, chat template, image settings ----


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    data_root: str = ""  # relative image paths are under it; "" = under the dataset file's own directory
    max_length: int = 4096  # tokens per row; a longer sample is cut at its end, never through an image
    pack: bool = True  # bin-pack samples into rows of max_length; else one padded sample per row
    batch_size: int = 1  # rows per batch
    pack_window: int = 1024  # samples packed together at a time (best-fit decreasing inside a window)
    min_pixels: int | None = None  # image bounds; None = the model dir's preprocessor_config.json or family's
    max_pixels: int | None = None  # None = the model dir's preprocessor_config.json or family's
    system_prompt: str | None = None  # None = the chat template's default (Qwen2.5-VL: one; Qwen3: none); "" = none
    think: bool | None = None  # <think> block on the last assistant turn; None = as the chat template does


@dataclass(frozen=True)
class Chat:
    """What a model dir decides about turning a conversation into tokens. Ids come from its config.json and
    tokenizer.json, never from this file: token *strings* are Qwen's, the numbers are the checkpoint's."""
    tokenizer: Tokenizer
    default_system: str  # inserted when a conversation has no system turn; "" = none
    think: bool  # the last assistant turn opens with <think>\n{reasoning}\n</think>\n\n (Qwen3 templates)
    image: pixels.ImageConfig | None  # None: a text-only LLM
    mrope: bool  # 3-D positions (a VLM) rather than 1-D
    image_token_id: int | None
    image_text: str  # what one <image> becomes before expansion: <|vision_start|><|image_pad|><|vision_end|>
    pad_id: int
    reserved: tuple[str, ...]  # special tokens a sample's own text may not contain


# The tokens the template and the image expansion place, which a sample's text may not hold. Qwen's other special
# tokens (<|box_start|>, <|object_ref_start|>, ... of its grounding format) are data and pass through.
RESERVED = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<|vision_pad|>")


def load_chat(path, cfg: DataConfig) -> Chat:
    """Read a model dir (config.json, tokenizer.json, chat template, preprocessor_config.json), cfg overriding."""
    d = Path(path)
    for name in ("config.json", "tokenizer.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d}: no {name}; --model must be a model directory")
    mc = weights.read_model_config(d)[1]
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    system, think = weights.template_defaults(weights.read_chat_template(d))

    def text_of(token_id: int | None, default: str) -> str:  # the token config.json names, or Qwen's default
        t = default if token_id is None else tok.id_to_token(token_id)
        if t is None or tok.token_to_id(t) is None:
            raise ValueError(f"{d}/tokenizer.json has no token {default if token_id is None else token_id!r}")
        return t

    image, image_text, image_id = None, "", None
    if (v := mc.vision) is not None:
        image = pixels.image_config_from_dir(d, v.patch_size, cfg.min_pixels, cfg.max_pixels)
        if (image.merge_size, image.temporal_patch_size) != (v.spatial_merge_size, v.temporal_patch_size):
            raise ValueError(f"{d}: preprocessor_config.json's merge / temporal patch sizes {image.merge_size} / "
                             f"{image.temporal_patch_size} differ from config.json's")
        pad = text_of(mc.image_token_id, "<|image_pad|>")
        image_id, image_text = tok.token_to_id(pad), (text_of(mc.vision_start_token_id, "<|vision_start|>") + pad
                                                      + text_of(mc.vision_end_token_id, "<|vision_end|>"))
    text_of(None, "<|im_start|>"), text_of(None, "<|im_end|>")  # the template's own tokens must exist too
    return Chat(tokenizer=tok, default_system=system if cfg.system_prompt is None else cfg.system_prompt,
                think=think if cfg.think is None else cfg.think, image=image, mrope=bool(mc.text.mrope_section),
                image_token_id=image_id, image_text=image_text,
                # pads are outside attention and loss: their id does not matter; this is the one Qwen pads with
                pad_id=tok.token_to_id(text_of(None, "<|endoftext|>")),
                reserved=tuple(t for t in RESERVED if tok.token_to_id(t) is not None))


# ---- datasets: LLaVA and ms-swift records -> samples, and what is wrong with them ----

IMAGE = "<image>"  # the placeholder both formats put where an image goes
FORMATS = {  # a sample's list of turns -> (role key, text key, its roles -> ours)
    "conversations": ("from", "value", {"human": "user", "gpt": "assistant", "system": "system"}),  # LLaVA
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),  # ms-swift
}
SAMPLE_KEYS = {"id", "image", "images", *FORMATS}


class Problem(typing.NamedTuple):
    where: str  # file:line
    kind: str  # a short fixed phrase, to count problems by
    detail: str = ""

    def __str__(self):
        return f"{self.where}: {self.kind}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class Sample:
    where: str  # file:line, for every message about it
    messages: tuple[tuple[str, str], ...]  # (role, text), role system | user | assistant; <image> marks images
    images: tuple[Path, ...]
    tokens: int = 0  # rendered length before any cut to max_length; set by check_dataset
    image_tokens: tuple[int, ...] = ()  # per image; set by check_dataset


def strict_object(pairs: list) -> dict:
    """object_pairs_hook: a key given twice is an error (json keeps the last value silently)."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


DECODER = json.JSONDecoder(object_pairs_hook=strict_object, parse_constant=no_constant)  # strict JSON


def read_records(path: Path) -> tuple[list[tuple[str, object]], list[Problem]]:
    """(file:line, JSON value) of each sample: one per line in .jsonl, the elements of one array in .json; strict
    JSON (no duplicate keys, NaN, trailing commas), UTF-8. A file that cannot be read is one problem."""
    if path.suffix not in (".json", ".jsonl"):
        return [], [Problem(f"{path}:0", "unknown file type",
                            "a dataset file is .json (one array of samples) or .jsonl (one sample a line)")]
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        return [], [Problem(f"{path}:0", "missing file", "no such dataset file")]
    except OSError as e:
        return [], [Problem(f"{path}:0", "unreadable file", str(e))]
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return [], [Problem(f"{path}:{line}", "not UTF-8",
                            f"byte {raw[e.start]:#x} at offset {e.start}; save the file as UTF-8; rest unread")]
    records, problems = [], []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            try:
                if line.strip():
                    records.append((f"{path}:{n}", DECODER.decode(line)))
            except ValueError as e:  # a JSONDecodeError, or strict_object's / no_constant's
                detail = f"{e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError) else str(e)
                problems.append(Problem(f"{path}:{n}", "bad JSON", detail))
        return records, problems
    # walk the array value by value, so that each sample is named by the line it starts on
    ws, line, counted = re.compile(r"\s*"), 1, 0

    def at(i: int) -> str:  # file:line of character i; i only grows, so lines are counted once
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, i), i
        return f"{path}:{line}"

    i = ws.match(text).end()
    if not text.startswith("[", i):
        return [], [Problem(at(i), "bad JSON", "a .json file holds one array of samples (.jsonl: one a line)")]
    i = ws.match(text, i + 1).end()
    while not text.startswith("]", i):
        try:
            value, end = DECODER.raw_decode(text, i)
        except json.JSONDecodeError as e:
            return records, [Problem(f"{path}:{e.lineno}", "bad JSON", f"{e.msg} (column {e.colno}); rest unread")]
        except ValueError as e:
            return records, [Problem(at(i), "bad JSON", f"{e}; rest unread")]
        records.append((at(i), value))
        i = ws.match(text, end).end()
        if not text.startswith((",", "]"), i):
            return records, [Problem(at(i), "bad JSON", "expected ',' or ']'; rest unread")]
        if text[i] == ",":
            i = ws.match(text, i + 1).end()
            if text.startswith("]", i):
                return records, [Problem(at(i), "bad JSON", "a trailing comma before ']' is not JSON")]
    return records, []


def preview(value) -> str:
    s = json.dumps(value, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def parse_sample(where: str, raw, root: Path) -> tuple[Sample | None, list[Problem]]:
    """A LLaVA or ms-swift record (FORMATS) as a Sample, or every problem found in it. Images are `image` (a path)
    or `images` (a list), relative to root, one per <image> placeholder, in order."""
    if not isinstance(raw, dict):
        return None, [Problem(where, "not an object", f"a sample is a JSON object, not {preview(raw)}")]
    out = []

    def bad(kind, detail=""):
        out.append(Problem(where, kind, detail))

    for key in sorted(raw.keys() - SAMPLE_KEYS):
        bad("unknown field", repr(key) + (": videos are not supported" if key in ("video", "videos") else ""))
    if ("conversations" in raw) == ("messages" in raw):
        both = "messages" in raw
        bad("conflicting fields" if both else "missing field",
            "a sample has `conversations` (LLaVA) or `messages` (ms-swift)" + (", not both" if both else ""))
        return None, out
    field = "conversations" if "conversations" in raw else "messages"
    role_key, text_key, roles = FORMATS[field]
    turns = raw[field]
    if not isinstance(turns, list) or not turns:
        bad("empty conversation", f"{field} is {preview(turns)}")
        return None, out
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            bad("missing field", f"turn {k} needs {role_key!r} and {text_key!r}")
            continue
        if extra := sorted(turn.keys() - {role_key, text_key}):
            bad("unknown field", f"turn {k}: {', '.join(map(repr, extra))}")
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            bad("unknown role", f"turn {k}: {turn[role_key]!r}, expected one of {', '.join(roles)}")
        elif not isinstance(turn[text_key], str):
            bad("bad field", f"turn {k}: {text_key} is {preview(turn[text_key])}, not a string")
        else:
            messages.append((role, turn[text_key]))
    if "image" in raw and "images" in raw:
        bad("conflicting fields", "`image` and `images`: use one")
    paths = raw.get("images", raw.get("image", []))
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        bad("bad field", f"images must be a path or a list of paths, not {preview(paths)}")
    if out:
        return None, out
    # the shape every chat template assumes: [system], user, assistant, user, assistant, ..., assistant
    first = 1 if messages[0][0] == "system" else 0
    body = [r for r, _ in messages[first:]]
    twice = next((k for k in range(len(body) - 1) if body[k] == body[k + 1]), None)
    if "system" in body:
        bad("bad order", f"turn {first + body.index('system')} is a system turn; only the first turn may be")
    elif not body or body[0] != "user":
        bad("bad order", "the conversation must start with a user turn (after an optional system turn)")
    elif twice is not None:
        bad("bad order", f"turns {first + twice} and {first + twice + 1} are both {body[twice]} turns; they alternate")
    elif body[-1] != "assistant":
        bad("bad order", "the last turn is a user turn: nothing to learn from")
    for k, (role, text) in enumerate(messages):
        if not text.strip() and role != "system":  # an empty system turn is legal: the template renders it
            bad("empty turn", f"turn {k} ({role}) has no text")
        elif IMAGE in text and role != "user":
            bad("misplaced <image>", f"in turn {k} ({role}); images go in user turns")
    if (n := sum(text.count(IMAGE) for _, text in messages)) != len(paths):
        bad("image count mismatch", f"{n} {IMAGE} placeholder(s) but {len(paths)} image(s)")
    return (None, out) if out else (Sample(where, tuple(messages), tuple(root / p for p in paths)), [])


def load_samples(files, data_root: str = "") -> tuple[list[Sample], list[Problem]]:
    """Every well-formed sample of the files, in order, and the problems of the rest (JSON and structure only:
    images and lengths are check_dataset's)."""
    samples, problems = [], []
    for f in map(Path, files):
        records, bad = read_records(f)
        problems += bad or ([] if records else [Problem(f"{f}:0", "empty dataset", "the file holds no samples")])
        for where, raw in records:
            s, bad = parse_sample(where, raw, Path(data_root) if data_root else f.parent)
            problems += bad
            samples += [s] if s else []
    return samples, problems


# ---- rendering: a sample as the chat template would write it, tokenised, with its labels ----


def render(sample: Sample, chat: Chat, counts: list[int]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a sample, ChatML as the model's chat template renders it: the default system turn
    if it has none, then `<|im_start|>{role}\\n{text}<|im_end|>\\n` a turn, each <image> as vision_start +
    counts[i] image pads + vision_end. Labels are -100 except on assistant text and its <|im_end|> (the
    loss shifts them). The text is tokenised whole, as the HF processor does, so no token boundary moves; a
    token is learned when its first character is."""
    messages = list(sample.messages)
    if messages[0][0] != "system" and chat.default_system:
        messages.insert(0, ("system", chat.default_system))
    text, learned = "", []  # learned: [start, end) character spans

    def add(s: str, learn: bool = False):
        nonlocal text
        if learn:
            learned.append((len(text), len(text) + len(s)))
        text += s

    for i, (role, content) in enumerate(messages):
        add(f"<|im_start|>{role}\n")
        if role == "assistant" and chat.think:  # as Qwen3's template: reasoning split off, kept on the last turn
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            if i == len(messages) - 1:  # an empty block is prompt, not answer: enable_thinking=False prompts with it
                add(f"<think>\n{reasoning}\n</think>\n\n", learn=bool(reasoning))
                content = content.lstrip("\n")
        add(content.replace(IMAGE, chat.image_text) + "<|im_end|>", learn=role == "assistant")
        add("\n")
    enc = chat.tokenizer.encode(text, add_special_tokens=False)
    if chat.image_token_id is not None and enc.ids.count(chat.image_token_id) != len(counts):  # check_sample's job
        raise ValueError(f"{sample.where}: {enc.ids.count(chat.image_token_id)} image pads for {len(counts)} images")
    ids, labels, counts, span = [], [], iter(counts), 0
    for t, (start, _) in zip(enc.ids, enc.offsets):
        while span < len(learned) and learned[span][1] <= start:
            span += 1
        learn = span < len(learned) and learned[span][0] <= start
        n = next(counts) if t == chat.image_token_id else 1  # the processor's expansion: a pad per merged token
        ids += [t] * n
        labels += [t if learn else -100] * n
    return ids, labels


def check_sample(sample: Sample, chat: Chat, max_length: int,
                 facts: dict[str, list] | None = None) -> tuple[Sample | None, list[Problem]]:
    """Render a sample with its images' sizes (`facts`: image_facts of each; None: decode them now): (the sample,
    measured, or None; its problems)."""
    out, counts = [], []

    def bad(kind, detail):
        out.append(Problem(sample.where, kind, detail))

    for k, (role, text) in enumerate(sample.messages):
        for t in chat.reserved:
            if t in text:
                bad("reserved token", f"turn {k} contains {t}; special tokens come from the chat template only")
    if sample.images and chat.image is None:
        bad("no vision tower", f"{len(sample.images)} image(s) but the model is a text-only LLM")
    for path in sample.images if chat.image else ():
        *_, height, width, problem = facts[str(path)] if facts is not None else pixels.image_facts(path)
        if problem:
            kind, _, detail = problem.partition(": ")
            bad(kind, detail or str(path))
            continue
        try:
            counts.append(pixels.image_tokens(height, width, chat.image))
        except ValueError as e:  # smart_resize: an aspect ratio over 200
            bad("bad image", f"{path}: {e}")
    if out:
        return None, out
    ids, labels = render(sample, chat, counts)
    if chat.image_token_id in ids[max_length:]:
        end = len(ids) - ids[::-1].index(chat.image_token_id)
        bad("image cut by max_length", f"{len(ids)} tokens and the last image ends at token {end} > {max_length}")
    elif all(label == -100 for label in labels[:max_length]):
        bad("nothing to learn", f"no assistant token in the first {max_length} (max_length)")
    return (None if out else replace(sample, tokens=len(ids), image_tokens=tuple(counts))), out


_CHECKING = None  # (chat, max_length, facts) for check_dataset's forked workers


def _check(sample):
    return check_sample(sample, *_CHECKING)


def cache_file(sample: Sample) -> Path:
    """Where the image facts of a sample's dataset file are cached: beside it."""
    data_file = Path(sample.where.rsplit(":", 1)[0])
    return data_file.with_name(data_file.name + ".images.json")


def check_dataset(samples: list[Sample], chat: Chat, cfg: DataConfig, num_workers: int = 0, rank: int = 0,
                  world_size: int = 1, gather=None) -> tuple[list[Sample], str, list[Problem]]:
    """Check every sample (its images decoded once, cached beside the data, then rendered): (the valid samples with
    their lengths, a summary, the problems). num_workers > 0 works in that many forked processes. Shared among
    ranks: each decodes and renders its share, and gather (one rank's results -> every rank's, e.g. an
    all_gather) brings them together, in order, on every rank."""
    global _CHECKING
    images = {str(p): cache_file(s) for s in samples for p in s.images}
    facts = pixels.check_images(images, num_workers, rank, world_size, gather) if chat.image else {}
    _CHECKING = (chat, cfg.max_length, facts)
    mine = samples[rank::world_size]
    if num_workers > 0 and len(mine) > 256:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            results = pool.map(_check, mine, chunksize=256)
    else:
        results = list(map(_check, mine))
    if world_size > 1:
        shards, results = gather(results), [None] * len(samples)
        for r, shard in enumerate(shards):
            results[r::world_size] = shard
    ok = [s for s, _ in results if s]
    tokens, per_image = sorted(s.tokens for s in ok), [n for s in ok for n in s.image_tokens]
    lines = [f"valid samples: {len(ok)} ({sum(bool(s.images) for s in ok)} with {len(per_image)} images, "
             f"{sum(not s.images for s in ok)} text-only)"]
    if ok:
        lines.append(f"tokens per sample: min {tokens[0]}, median {tokens[len(ok) // 2]}, max {tokens[-1]}; "
                     f"{sum(n > cfg.max_length for n in tokens)} over max_length {cfg.max_length}, cut at the end")
    if per_image:
        lines.append(f"image tokens: {sum(per_image)}, {min(per_image)} to {max(per_image)} per image")
    return ok, "\n".join(lines), [p for _, bad in results for p in bad]


def describe_problems(problems: list[Problem], repeats: int = 3) -> str:
    """How many problems, in how many samples, of which kinds; then each problem as file:line: reason, in file
    order, a problem repeated word for word in other samples shown `repeats` times and then counted."""
    kinds = Counter(p.kind for p in problems).most_common()
    lines = [f"{len(problems)} problem(s) in {len({p.where for p in problems})} sample(s): "
             + ", ".join(f"{n} {kind}" for kind, n in kinds)]
    seen = Counter()
    for p in sorted(problems, key=lambda p: (p.where.rsplit(":", 1)[0], int(p.where.rsplit(":", 1)[1]))):
        seen[p.kind, p.detail] += 1
        if seen[p.kind, p.detail] <= repeats:
            lines.append(str(p))
    lines += [f"... and {n - repeats} more like this: {kind}" + (f": {detail}" if detail else "")
              for (kind, detail), n in seen.items() if n > repeats]
    return "\n".join(lines)


# ---- tensors, packing, batches ----


@dataclass(frozen=True)
class Example:
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,), -100 where nothing is learned
    position_ids: torch.Tensor  # (3, T), this sample's own, from 0
    pixel_values: torch.Tensor | None  # (patches, C*T*p*p), its images' rows in order
    image_grid_thw: torch.Tensor | None  # (images, 3)


def encode(sample: Sample, chat: Chat, max_length: int) -> Example:
    """A checked sample as tensors: images preprocessed, text rendered and cut to max_length, 3-D positions."""
    pixel_values = grid = None
    counts = []
    if sample.images:
        pixel_values, grid = pixels.preprocess_images([pixels.load_image(p) for p in sample.images], chat.image)
        counts = pixels.num_image_tokens(grid, chat.image.merge_size)
    ids, labels = (torch.tensor(x[:max_length]) for x in render(sample, chat, counts))
    if chat.mrope:  # rope_index raises if the cut went through an image: check_dataset rules that out
        pos = model.rope_index(ids[None], grid, chat.image_token_id, chat.image.merge_size)[0][:, 0]
    else:
        pos = torch.arange(len(ids)).expand(3, -1)
    return Example(ids, labels, pos, pixel_values, grid)


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin-pack items of these lengths into rows of `capacity` (lists of item indices), best-fit decreasing: longest
    first, each into the fullest row it still fits; rows come out nearly full, unlike concatenating in order."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free slots, row), sorted: bisect finds the tightest fit
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            rows.append([])
            free, row = capacity, len(rows) - 1
        else:
            free, row = room.pop(k)
        if lengths[i] > free:
            raise ValueError(f"an item of {lengths[i]} tokens does not fit a row of {capacity}")
        rows[row].append(i)
        if free > lengths[i]:
            bisect.insort(room, (free - lengths[i], row))
    return rows


def plan(lengths: list[int], cfg: DataConfig, seed: int, epoch: int, rank: int = 0,
         world_size: int = 1) -> tuple[list[list[list[int]]], int]:
    """One epoch's batches for `rank` as sample indices (batch -> rows -> samples), and how many samples it drops.
    A pure function of its arguments, so every rank and every resumed run computes the same. Each rank packs a
    disjoint shard of one shuffled order; all ranks stop at the shortest's batch count, as every step is a
    collective (the samples past it are dropped and counted)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    per_rank = []
    for r in range(world_size):
        shard = order[r::world_size].tolist()
        if not cfg.pack:
            rows = [[i] for i in shard]
        else:
            rows = []
            for w in range(0, len(shard), cfg.pack_window):
                window = shard[w : w + cfg.pack_window]
                bins = [[window[j] for j in row] for row in pack([lengths[i] for i in window], cfg.max_length)]
                np.random.default_rng([seed, epoch, r, w]).shuffle(bins)  # else the longest samples lead each window
                rows += bins
        per_rank.append([rows[b : b + cfg.batch_size] for b in range(0, len(rows), cfg.batch_size)])
    n = min(len(batches) for batches in per_rank)
    return per_rank[rank][:n], sum(len(row) for batch in per_rank[rank][n:] for row in batch)


def efficiency(batches, lengths: list[int], cfg: DataConfig) -> float:
    """Real tokens / slots of the batches collate makes (packed rows are max_length; padded ones the longest)."""
    real = sum(lengths[i] for batch in batches for row in batch for i in row)
    slots = sum(len(batch) * (cfg.max_length if cfg.pack else max(sum(lengths[i] for i in row) for row in batch))
                for batch in batches)
    return real / max(slots, 1)


def collate(rows: list[list[Example]], pad_id: int, mrope: bool, length: int | None = None) -> dict:
    """Rows of examples -> one batch: VLM.forward's keyword arguments plus labels, right-padded to `length` or the
    longest row. A packed row holds several examples, each with positions from 0, kept apart by doc_ids (present
    only then); pixel_values / image_grid_thw (images in token order) only when the batch has images."""
    B, T = len(rows), length or max(sum(len(e.input_ids) for e in row) for row in rows)
    ids, labels = torch.full((B, T), pad_id), torch.full((B, T), -100)
    mask, docs = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    pos, images, grids = torch.zeros(3, B, T, dtype=torch.long), [], []
    for b, row in enumerate(rows):
        t = 0
        for d, e in enumerate(row, 1):
            at = slice(t, t + len(e.input_ids))  # this example's columns
            ids[b, at], labels[b, at], pos[:, b, at] = e.input_ids, e.labels, e.position_ids
            mask[b, at], docs[b, at], t = 1, d, at.stop
            if e.pixel_values is not None:
                images.append(e.pixel_values)
                grids.append(e.image_grid_thw)
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask, position_ids=pos if mrope else pos[0])
    if any(len(row) > 1 for row in rows):
        batch["doc_ids"] = docs
    if images:
        batch["pixel_values"], batch["image_grid_thw"] = torch.cat(images), torch.cat(grids)
    return batch


def make_batch(rows: list[list[int]], samples: list[Sample], chat: Chat, cfg: DataConfig) -> dict:
    """One planned batch, built whole in one worker: its images and its tokens never travel apart."""
    examples = [[encode(samples[i], chat, cfg.max_length) for i in row] for row in rows]
    return collate(examples, chat.pad_id, chat.mrope, cfg.max_length if cfg.pack else None)


class Loader:
    """One rank's batches, epoch after epoch: a disjoint shard, shuffled from (seed, epoch), packed or padded,
    built by `num_workers` processes in plan order. `offset` counts this rank's samples consumed this epoch, up
    to the last batch handed out; `batches(epoch, start=offset)` resumes right after it."""

    def __init__(self, samples: list[Sample], chat: Chat, cfg: DataConfig, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool = False):
        if not samples or any(s.tokens == 0 for s in samples):
            raise ValueError("Loader takes the samples check_dataset returns (it measures them), and at least one")
        self.samples, self.chat, self.cfg, self.num_workers = samples, chat, cfg, num_workers
        self.pin_memory = pin_memory  # page-locked batches: the copy to the GPU runs beside compute
        self.rank, self.world_size, self.seed, self.offset = rank, world_size, seed, 0
        self.lengths = [min(s.tokens, cfg.max_length) for s in samples]

    def plan(self, epoch: int):
        return plan(self.lengths, self.cfg, self.seed, epoch, self.rank, self.world_size)

    def efficiency(self, epoch: int) -> float:
        return efficiency(self.plan(epoch)[0], self.lengths, self.cfg)

    def batches(self, epoch: int, start: int = 0):
        batches, _ = self.plan(epoch)
        ends = np.cumsum([0] + [sum(map(len, batch)) for batch in batches])  # samples consumed after each batch
        first = int(np.searchsorted(ends, start))
        if first == len(ends) or ends[first] != start:
            raise ValueError(f"start={start} is not a batch boundary of epoch {epoch} on rank {self.rank}; "
                             f"resume from a `loader.offset` saved by the same data settings")
        make = functools.partial(make_batch, samples=self.samples, chat=self.chat, cfg=self.cfg)
        workers = torch.utils.data.DataLoader(batches[first:], batch_size=None, collate_fn=make,
                                              num_workers=self.num_workers, pin_memory=self.pin_memory)
        self.offset = start
        for b, batch in enumerate(workers, first):
            self.offset = int(ends[b + 1])
            yield batch


# ---- the linter ----


def main(argv=None) -> int:
    """python data.py FILE... --model DIR [--data-root DIR] [...]: check a whole dataset, print a summary and every
    problem as file:line: reason; exit status 1 when there is any."""
    p = cli.parser(DataConfig, main.__doc__)
    p.add_argument("files", nargs="+", help=".json (one array) or .jsonl (one sample a line); LLaVA or ms-swift")
    p.add_argument("--model", required=True, help="model dir: config.json, tokenizer files, chat template")
    p.add_argument("--num-workers", type=int, default=0, help="processes that decode images")
    args = p.parse_args(argv)
    cfg = cli.settings(DataConfig, args, p)
    try:
        chat = load_chat(args.model, cfg)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"checking with max_length {cfg.max_length} (train.py's default too)")
    samples, problems = load_samples(args.files, cfg.data_root)
    samples, summary, more = check_dataset(samples, chat, cfg, args.num_workers)
    print(summary)
    if samples:
        loader = Loader(samples, chat, cfg)
        print(f"{'packed' if cfg.pack else 'padded'} into {sum(map(len, loader.plan(0)[0]))} rows "
              f"(batch size {cfg.batch_size}): {loader.efficiency(0):.1%} of the slots are real tokens")
    if problems + more:
        print(describe_problems(problems + more))
    return 1 if problems + more else 0


if __name__ == "__main__":
    sys.exit(main())
