"""Data: LLaVA / ms-swift datasets to checked, rendered, packed batches (reading the files is records.py's,
pixels are pixels.py's).

In order: the model dir's side (tokenizer, chat template, image and video settings) -> rendering a sample as its
chat template would, with labels -> the check (the linter's core) -> tensors, packing, the loader -> the
linter's command line.

For train.py (`python data.py FILE... --model DIR` is its first four steps, as a linter):
    cfg = DataConfig(max_length=4096, ...)                      # the user's data choices, one flag each
    chat = load_chat(model_dir, cfg)                            # what the model dir decides: tokens, template
    samples, problems = load_samples(files, cfg.data_root)      # JSON and structure
    samples, summary, more = check_dataset(samples, chat, cfg)  # media decoded, samples measured, valid kept
    problems += more                                            # on any problem stop, unless told to skip them
    loader = Loader(samples, chat, cfg, rank, world_size, seed, num_workers)   # loader.efficiency(epoch)
    for batch in loader.batches(epoch, start=offset):           # VLM.forward's kwargs + labels
        loss = F.cross_entropy(logits[:, :-1] ..., batch["labels"][:, 1:] ..., ignore_index=-100)
        offset = loader.offset                                  # save it: batches(epoch, start=offset) resumes
"""

import bisect
import functools
import multiprocessing
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

import cli
import model
import pixels
import weights
from records import IMAGE, VIDEO, Problem, Sample, describe_problems, load_samples  # noqa: F401 (train.py's steps)


# ---- the model dir's side: tokenizer, chat template, image and video settings ----


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    data_root: str = ""  # relative image and video paths are under it; "" = under the dataset file's directory
    max_length: int = 4096  # tokens per row; a longer sample is cut at its end, never through an image or video
    pack: bool = True  # bin-pack samples into rows of max_length; else one padded sample per row
    batch_size: int = 1  # rows per batch
    pack_window: int = 1024  # samples packed together at a time (best-fit decreasing inside a window)
    min_pixels: int | None = None  # image bounds; None = the model dir's preprocessor_config.json or family's
    max_pixels: int | None = None  # None = the model dir's preprocessor_config.json or family's
    fps: float | None = None  # video frames sampled a second; None = the model dir's video_preprocessor_config.json
    max_frames: int | None = None  # frames kept of a video at most; None = the model dir's
    video_max_pixels: int | None = None  # a video's pixel bound (Qwen2.5-VL: per frame, Qwen3-VL: all frames)
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
    video: pixels.VideoConfig | None  # None: no video (a text-only LLM, or a config without video_token_id)
    video_token_id: int | None
    video_marks: tuple[str, ...]  # (pad, vision_start, vision_end): pixels.video_text's tokens
    tokens_per_second: float | None  # Qwen2.5-VL's time-aligned M-RoPE (None: Qwen3-VL's timestamps in text)
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

    image, image_text, image_id, video, video_id, marks = None, "", None, None, None, ()
    if (v := mc.vision) is not None:
        image = pixels.image_config_from_dir(d, v.patch_size, cfg.min_pixels, cfg.max_pixels)
        if (image.merge_size, image.temporal_patch_size) != (v.spatial_merge_size, v.temporal_patch_size):
            raise ValueError(f"{d}: preprocessor_config.json's merge / temporal patch sizes {image.merge_size} / "
                             f"{image.temporal_patch_size} differ from config.json's")
        pad = text_of(mc.image_token_id, "<|image_pad|>")
        start = text_of(mc.vision_start_token_id, "<|vision_start|>")
        end = text_of(mc.vision_end_token_id, "<|vision_end|>")
        image_id, image_text = tok.token_to_id(pad), start + pad + end
        if video := weights.video_config(d, mc, cfg.fps, cfg.max_frames, cfg.video_max_pixels):
            video_id, marks = mc.video_token_id, (text_of(mc.video_token_id, "<|video_pad|>"), start, end)
    text_of(None, "<|im_start|>"), text_of(None, "<|im_end|>")  # the template's own tokens must exist too
    return Chat(tokenizer=tok, default_system=system if cfg.system_prompt is None else cfg.system_prompt,
                think=think if cfg.think is None else cfg.think, image=image, mrope=bool(mc.text.mrope_section),
                image_token_id=image_id, image_text=image_text, video=video, video_token_id=video_id,
                video_marks=marks, tokens_per_second=mc.tokens_per_second,
                # pads are outside attention and loss: their id does not matter; this is the one Qwen pads with
                pad_id=tok.token_to_id(text_of(None, "<|endoftext|>")),
                reserved=tuple(t for t in RESERVED if tok.token_to_id(t) is not None))


# ---- rendering: a sample as the chat template would write it, tokenised, with its labels ----


def render(sample: Sample, chat: Chat, counts: list[int],
           videos: list[tuple[list[int], list[float] | None]] = ()) -> tuple[list[int], list[int]]:
    """Token ids and labels of a sample, ChatML as the model's chat template renders it: the default system turn
    if it has none, then `<|im_start|>{role}\\n{text}<|im_end|>\\n` a turn, each <image> as vision_start +
    counts[i] image pads + vision_end, each <video> as its processor writes it from (pads per block, timestamps
    or None) of `videos` (pixels.video_text: Qwen3-VL a "<t seconds>" block per frame pair). Labels are -100
    except on assistant text and its <|im_end|> (the loss shifts them). The text is tokenised whole, as the HF
    processor does, so no token boundary moves; a token is learned when its first character is."""
    messages = list(sample.messages)
    if messages[0][0] != "system" and chat.default_system:
        messages.insert(0, ("system", chat.default_system))
    text, learned, n_videos = "", [], 0  # learned: [start, end) character spans

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
        content = content.replace(IMAGE, chat.image_text)
        for _ in range(content.count(VIDEO)):  # the user's text cannot hold "<video>" otherwise: parse_sample
            content = content.replace(VIDEO, pixels.video_text(videos[n_videos][1], *chat.video_marks), 1)
            n_videos += 1
        add(content + "<|im_end|>", learn=role == "assistant")
        add("\n")
    enc = chat.tokenizer.encode(text, add_special_tokens=False)
    blocks = [n for video_blocks, _ in videos for n in video_blocks]
    for pad, want in ((chat.image_token_id, counts), (chat.video_token_id, blocks)):  # check_sample's job
        if pad is not None and enc.ids.count(pad) != len(want):
            raise ValueError(f"{sample.where}: {enc.ids.count(pad)} pads of id {pad} for {len(want)} images / blocks")
    ids, labels, span, expand = [], [], 0, {chat.image_token_id: iter(counts), chat.video_token_id: iter(blocks)}
    for t, (start, _) in zip(enc.ids, enc.offsets):
        while span < len(learned) and learned[span][1] <= start:
            span += 1
        learn = span < len(learned) and learned[span][0] <= start
        n = next(expand[t]) if t in expand else 1  # the processor's expansion: a pad per merged token
        ids += [t] * n
        labels += [t if learn else -100] * n
    return ids, labels


def video_layout(cfg: pixels.VideoConfig, indices: list[int], fps: float, height: int,
                 width: int) -> tuple[list[int], list[float] | None]:
    """(pads per block, timestamps or None) of a video whose kept source frames are `indices`, at `fps`, of this
    size: what render writes for its <video> (Qwen3-VL: one block and one "<t seconds>" per frame pair)."""
    blocks = pixels.video_blocks(len(indices), height, width, cfg)
    return blocks, pixels.frame_timestamps(indices, fps, cfg.temporal_patch_size) if cfg.text_timestamps else None


def check_sample(sample: Sample, chat: Chat, max_length: int, facts: dict[str, list] | None = None,
                 video_facts: dict[str, list] | None = None) -> tuple[Sample | None, list[Problem]]:
    """Render a sample with its images' and videos' sizes (`facts`: image_facts of each image and frame,
    `video_facts`: video_facts of each video file; None: decode them now): (the sample, measured, or None; its
    problems)."""
    out, counts, videos = [], [], []

    def bad(kind, detail):
        out.append(Problem(sample.where, kind, detail))

    def fact(path, video=False) -> list | None:  # [height, width] ([frames, fps, height, width] of a video file)
        table, facts_of = (video_facts, pixels.video_facts) if video else (facts, pixels.image_facts)
        row = table[str(path)] if table is not None else facts_of(Path(path))  # [size, mtime, ..., problem]
        if row[-1]:
            kind, _, detail = row[-1].partition(": ")
            bad(kind, detail or str(path))
        return None if row[-1] else row[2:-1]

    for k, (role, text) in enumerate(sample.messages):
        for t in chat.reserved:
            if t in text:
                bad("reserved token", f"turn {k} contains {t}; special tokens come from the chat template only")
    for what, given, cfg in (("image", sample.images, chat.image), ("video", sample.videos, chat.video)):
        if given and cfg is None:
            bad("no vision tower" if chat.image is None else "no video support", f"{len(given)} {what}(s) but the "
                + ("model is a text-only LLM" if chat.image is None else "model's config.json has no video_token_id"))
    for path in sample.images if chat.image else ():
        if size := fact(path):
            try:
                counts.append(pixels.image_tokens(*size, chat.image))
            except ValueError as e:  # smart_resize: an aspect ratio over 200
                bad("bad image", f"{path}: {e}")
    for source in sample.videos if chat.video else ():
        frames = pixels.frame_paths(source)
        if frames is None:  # a video file: its header's frame count and rate
            total, fps, *size = fact(source, video=True) or (0, 0.0)
        else:  # frames: all decode, one size
            sizes = {tuple(size) for f in frames if (size := fact(f))}
            total, fps, size = len(frames), chat.video.fps, list(sizes)[0] if len(sizes) == 1 else None
            if len(sizes) > 1 or not frames:
                bad("bad video", f"{source}: " + (f"frames of {len(sizes)} sizes" if frames else "no frame images"))
        try:
            if size:
                idx = pixels.video_indices(total, fps, chat.video, frames_given=frames is not None)
                videos.append(video_layout(chat.video, idx, fps, *size))
        except ValueError as e:  # too few frames, an aspect ratio over 200
            bad("bad video", f"{source}: {e}")
    if out:
        return None, out
    ids, labels = render(sample, chat, counts, videos)
    pads = {chat.image_token_id, chat.video_token_id} - {None}
    if cut := [t for t in ids[max_length:] if t in pads]:
        end = len(ids) - next(i for i, t in enumerate(reversed(ids)) if t in pads)
        what = "image" if cut[-1] == chat.image_token_id else "video"
        bad(f"{what} cut by max_length", f"{len(ids)} tokens and the last {what} ends at token {end} > {max_length}")
    elif all(label == -100 for label in labels[:max_length]):
        bad("nothing to learn", f"no assistant token in the first {max_length} (max_length)")
    if out:
        return None, out
    return replace(sample, tokens=len(ids), image_tokens=tuple(counts),
                   video_tokens=tuple(sum(blocks) for blocks, _ in videos)), out


_CHECKING = None  # (chat, max_length, facts, video_facts) for check_dataset's forked workers


def _check(sample):
    return check_sample(sample, *_CHECKING)


def cache_file(sample: Sample, kind: str = "images") -> Path:
    """Where the image (or video) facts of a sample's dataset file are cached: beside it."""
    data_file = Path(sample.where.rsplit(":", 1)[0])
    return data_file.with_name(f"{data_file.name}.{kind}.json")


def check_dataset(samples: list[Sample], chat: Chat, cfg: DataConfig, num_workers: int = 0, rank: int = 0,
                  world_size: int = 1, gather=None) -> tuple[list[Sample], str, list[Problem]]:
    """Check every sample (its images and videos decoded once, cached beside the data, then rendered): (the valid
    samples with their lengths, a summary, the problems). num_workers > 0 works in that many forked processes.
    Shared among ranks: each decodes and renders its share, and gather (one rank's results -> every rank's, e.g.
    an all_gather) brings them together, in order, on every rank."""
    global _CHECKING
    images = {str(p): cache_file(s) for s in samples for p in s.images}
    videos = {}
    for s in samples if chat.video else ():
        for v in s.videos:
            frames = pixels.frame_paths(v)
            images |= {str(f): cache_file(s) for f in frames or ()}
            videos |= {} if frames is not None else {str(v): cache_file(s, "videos")}
    facts = pixels.check_files(images, num_workers, rank, world_size, gather) if chat.image else {}
    video_facts = pixels.check_files(videos, num_workers, rank, world_size, gather, pixels.video_facts)
    _CHECKING = (chat, cfg.max_length, facts, video_facts)
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
    tokens = sorted(s.tokens for s in ok)
    per_image, per_video = [n for s in ok for n in s.image_tokens], [n for s in ok for n in s.video_tokens]
    with_videos = f"{sum(bool(s.videos) for s in ok)} with {len(per_video)} videos, " if per_video else ""
    lines = [f"valid samples: {len(ok)} ({sum(bool(s.images) for s in ok)} with {len(per_image)} images, "
             f"{with_videos}{sum(not s.images and not s.videos for s in ok)} text-only)"]
    if ok:
        lines.append(f"tokens per sample: min {tokens[0]}, median {tokens[len(ok) // 2]}, max {tokens[-1]}; "
                     f"{sum(n > cfg.max_length for n in tokens)} over max_length {cfg.max_length}, cut at the end")
    for what, per in (("image", per_image), ("video", per_video)):
        if per:
            lines.append(f"{what} tokens: {sum(per)}, {min(per)} to {max(per)} per {what}")
    return ok, "\n".join(lines), [p for _, bad in results for p in bad]


# ---- tensors, packing, batches ----


@dataclass(frozen=True)
class Example:
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,), -100 where nothing is learned
    position_ids: torch.Tensor  # (3, T), this sample's own, from 0
    pixel_values: torch.Tensor | None  # (patches, C*T*p*p), its images' rows in order
    image_grid_thw: torch.Tensor | None  # (images, 3)
    pixel_values_videos: torch.Tensor | None = None  # (patches, C*T*p*p), its videos' rows in order
    video_grid_thw: torch.Tensor | None = None  # (videos, 3)


def encode(sample: Sample, chat: Chat, max_length: int) -> Example:
    """A checked sample as tensors: images and videos preprocessed, text rendered and cut to max_length, 3-D
    positions (Qwen2.5-VL's video frames placed in time by their second_per_grid, which the positions carry)."""
    pixel_values = grid = pixel_values_videos = video_grid = None
    counts, layouts, seconds = [], [], []
    if sample.images:
        pixel_values, grid = pixels.preprocess_images([pixels.load_image(p) for p in sample.images], chat.image)
        counts = pixels.num_image_tokens(grid, chat.image.merge_size)
    if sample.videos:
        rows, grids = [], []
        for source in sample.videos:
            video = pixels.load_video(source, chat.video)
            pv, g = pixels.preprocess_video(video.frames, chat.video)
            rows.append(pv), grids.append(g), seconds.append(video.second_per_grid(chat.video))
            layouts.append(video_layout(chat.video, video.indices, video.fps, *video.frames.shape[1:3]))
            if sum(layouts[-1][0]) != g.prod() // chat.video.merge_size**2:
                raise ValueError(f"{sample.where}: {source} decodes to {g.tolist()} patches, not the size it was "
                                 f"checked at: has the file changed since?")
        pixel_values_videos, video_grid = torch.cat(rows), torch.cat(grids)
    ids, labels = (torch.tensor(x[:max_length]) for x in render(sample, chat, counts, layouts))
    if chat.mrope:  # rope_index raises if the cut went through an image: check_dataset rules that out
        merge = chat.image.merge_size
        pos = model.rope_index(ids[None], grid, chat.image_token_id, merge, video_grid_thw=video_grid,
                               video_token_id=chat.video_token_id, second_per_grid_ts=seconds or None,
                               tokens_per_second=chat.tokens_per_second)[0][:, 0]
    else:
        pos = torch.arange(len(ids)).expand(3, -1)
    return Example(ids, labels, pos, pixel_values, grid, pixel_values_videos, video_grid)


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


MEDIA = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")  # Example's, in collate's batch


def collate(rows: list[list[Example]], pad_id: int, mrope: bool, length: int | None = None) -> dict:
    """Rows of examples -> one batch: VLM.forward's keyword arguments plus labels, right-padded to `length` or the
    longest row. A packed row holds several examples, each with positions from 0, kept apart by doc_ids (present
    only then); pixel_values / image_grid_thw (images in token order) only when the batch has images, and
    pixel_values_videos / video_grid_thw likewise (no second_per_grid_ts: the positions already hold it)."""
    B, T = len(rows), length or max(sum(len(e.input_ids) for e in row) for row in rows)
    ids, labels = torch.full((B, T), pad_id), torch.full((B, T), -100)
    mask, docs = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    pos, media = torch.zeros(3, B, T, dtype=torch.long), {k: [] for k in MEDIA}
    for b, row in enumerate(rows):
        t = 0
        for d, e in enumerate(row, 1):
            at = slice(t, t + len(e.input_ids))  # this example's columns
            ids[b, at], labels[b, at], pos[:, b, at] = e.input_ids, e.labels, e.position_ids
            mask[b, at], docs[b, at], t = 1, d, at.stop
            for k in MEDIA:
                if getattr(e, k) is not None:
                    media[k].append(getattr(e, k))
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask, position_ids=pos if mrope else pos[0])
    if any(len(row) > 1 for row in rows):
        batch["doc_ids"] = docs
    return batch | {k: torch.cat(v) for k, v in media.items() if v}


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
    p.add_argument("--num-workers", type=int, default=0, help="processes that decode images and videos")
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
