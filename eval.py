"""Benchmark evaluation, offline, on VLMEvalKit's TSV files or LLaVA / ms-swift jsonl with reference answers.

    python eval.py --model DIR --data MMStar.tsv ChartQA_TEST.tsv [--max-samples N] [--batch-size N] [--out DIR]
    python eval.py --model DIR --data videoqa.jsonl [--fps 1 --max-frames 16]    # jsonl rows with "video(s)"

Video benchmarks are jsonl: VLMEvalKit has no one video TSV layout (each of its video datasets, Video-MME,
MVBench, ..., writes its own columns, prompts and frame sampling when it downloads), so such a TSV is refused.

A row with options (TSV columns A, B, ...; or a jsonl reference that is one letter) is multiple choice: the prompt
lists the options and asks for the letter; every other row is short-answer. Prompts are built as VLMEvalKit builds
them for Qwen; answers are greedy, batched (left-padded: the same tokens as one at a time). Each file is scored by
its benchmark's published protocol (scores.py: VLMEvalKit's rules for multiple choice, the official scorer for
TextVQA / DocVQA / ChartQA / OCRBench), chosen by the file's name; summary.json and the console name the protocol
beside every number, and our more lenient readings are extra, named columns (README: "What the scores mean").
--out gets <data stem>.jsonl (a line per sample: prompt, prediction, extracted letters, scores) and summary.json
(the settings; per file: each score with its protocol, overall and per category, unreadable answers, samples/s).
"""
from __future__ import annotations

import ast
import base64
import csv
import dataclasses
import io
import json
import re
import string
import sys
import time
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import pixels
import records
import sample
import scores
import weights


@dataclass
class EvalConfig:
    model: str = ""  # HF-layout model dir (config.json, safetensors, tokenizer.json), e.g. train.py's --out
    data: list[str] = field(default_factory=list)  # .tsv (VLMEvalKit) and .jsonl (LLaVA / ms-swift) files
    data_root: str = ""  # relative image and video paths (jsonl, TSV image_path) are under it; "" = the data file's dir
    out: str = "out/eval"  # predictions (<data stem>.jsonl) and summary.json
    max_samples: int = 0  # per file; 0 = all
    batch_size: int = 8  # prompts decoded together, left-padded
    max_new_tokens: int = 64  # answers are a letter or a short phrase; a longer one is cut here
    max_pixels: int = 0  # 0 = the model dir's preprocessor setting; lower it to spend fewer tokens per image
    fps: float = 0  # video frames sampled a second (a folder's: taken at); 0 = the model dir's video setting
    max_frames: int = 0  # at most this many frames a video; 0 = the model dir's video setting
    video_max_pixels: int = 0  # 0 = the model dir's; lower = fewer tokens a video (Qwen2.5-VL: per frame, 3-VL: all)
    adapter: str = ""  # a PEFT LoRA adapter dir, merged into --model when loaded
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    device: str = ""  # "" = cuda if available, else cpu

    def __post_init__(self):
        cli.at_least(self, 1, "batch_size", "max_new_tokens")
        cli.at_least(self, 0, "max_samples", "max_pixels", "fps", "max_frames", "video_max_pixels")


def parse_args(argv=None) -> EvalConfig:
    p = cli.parser(EvalConfig, __doc__)
    cfg = cli.settings(EvalConfig, p.parse_args(argv), p)
    if not cfg.model or not cfg.data:
        p.error("--model DIR and --data FILE... are required")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# reading rows: every failure names the file, the row and what is wrong


@dataclass
class Sample:
    where: str  # "MMStar.tsv row 17 (index 16)": for messages
    index: str
    turns: list[tuple[str, str]]  # (role, text); "<image>" / "<video>" in a text marks where one goes
    images: list  # base64 text (TSV `image` column) or Path, one per "<image>", decoded when its batch runs
    refs: list[str]  # reference answers; multiple choice: the one letter
    options: dict[str, str] = field(default_factory=dict)  # letter -> option text; {} for short-answer
    category: str = ""
    videos: list = field(default_factory=list)  # Path (a file, a folder of frames) or its frames, one per "<video>"


def as_list(cell: str) -> list[str]:
    """VLMEvalKit's cells for several values (images, reference answers) are Python / JSON lists in text."""
    if not (cell.startswith("[") and cell.endswith("]")):
        return [cell]
    try:
        items = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return [cell]  # text that only looks like a list: a literal answer
    return [str(x) for x in items] if isinstance(items, list) and items else [cell]


def read_tsv(path: str | Path, max_samples: int = 0, root: str | Path = "") -> list[Sample]:
    """VLMEvalKit TSV: index, question, answer, option columns A, B, ..., image (base64, a list of them, or the index
    of a row with the same image) or image_path (under `root`, default the TSV's directory), optional hint, category."""
    path = Path(path)
    root = Path(root or path.parent)
    csv.field_size_limit(2**31 - 1)  # a base64 image is megabytes; the csv module's default limit is 128 KiB
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of "index"
        reader = csv.DictReader(f, delimiter="\t")
        cols = reader.fieldnames or []
        if missing := [c for c in ("index", "question", "answer") if c not in cols]:
            raise ValueError(f"{path}: no {', '.join(missing)} column; a VLMEvalKit TSV has index, question, answer, "
                             f"A, B, ... and image or image_path (this one has: {', '.join(cols)})")
        if {"video", "video_path"} & set(cols):  # read as text-only rows, it would score without its videos
            raise ValueError(f"{path}: a VLMEvalKit video TSV (a 'video' column): not read, as each video dataset "
                             f"has its own layout; write its rows as jsonl with a \"video\" path each (eval.py --help)")
        rows = list(reader)
    letters = [c for c in cols if len(c) == 1 and c in string.ascii_uppercase]
    image_of = {r["index"]: r.get("image") or "" for r in rows}
    samples, skipped = [], 0
    for n, row in enumerate(rows, 1):
        if max_samples and len(samples) == max_samples:
            break
        where = f"{path} row {n} (index {row['index']})"
        extra = row.pop(None, [])  # csv.DictReader keeps surplus fields under None and fills missing ones with None
        if extra or None in row.values():
            raise ValueError(f"{where}: {sum(v is not None for v in row.values()) + len(extra)} fields where the "
                             f"header has {len(row)}: a tab or a quote out of place")
        if "image" in cols and not (row["image"] or row.get("image_path") or "").strip():
            skipped += 1  # as VLMEvalKit does (ImageBaseDataset, skip_noimg): its scores leave these rows out
            continue
        try:
            samples.append(tsv_sample(row, letters, image_of, root, where))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{where}: {e}") from None
    if skipped:
        print(f"{path}: {skipped} rows without an image left out, as VLMEvalKit leaves them out", file=sys.stderr)
    return samples


def tsv_sample(row: dict, letters: list[str], image_of: dict, root: Path, where: str) -> Sample:
    cell = {k: v.strip() for k, v in row.items()}  # pandas writes a missing value (NaN) as an empty cell
    question, answer = cell["question"], cell["answer"]
    if not question or not answer:
        raise ValueError("empty question or answer")
    options = {c: cell[c] for c in letters if cell[c]}
    if options and answer not in options:
        raise ValueError(f"answer {answer!r} is not one of its options {', '.join(options)}")
    image = cell.get("image", "")
    if image and len(image) <= 64:  # VLMEvalKit stores a repeated image once; the others name that row's index
        image = image_of.get(image, "")
        if len(image) <= 64:
            raise ValueError(f"image {cell['image']!r} names no row with an image")
    paths = as_list(cell["image_path"]) if cell.get("image_path") else []
    images = as_list(image) if image else [root / p for p in paths]
    text = mcq_prompt(question, options, cell.get("hint", "")) if options else vqa_prompt(question)
    refs = [answer] if options else as_list(answer)
    # Qwen's VLMEvalKit prompts put every image first, then the text (MMMU's "<image 1>" stays in the text)
    return Sample(where, cell["index"], [("user", "<image>" * len(images) + text)], images, refs, options,
                  cell.get("category", ""))


def open_image(src: str | Path):
    """A row's image, decoded: base64 text (the TSV `image` column) or a file."""
    return pixels.load_image(src if isinstance(src, Path) else io.BytesIO(base64.b64decode(src)))


ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def read_jsonl(path: str | Path, max_samples: int = 0, root: str | Path = "") -> list[Sample]:
    """ms-swift ({"messages": [{"role", "content"}], "images", "videos"}) or LLaVA ({"conversations": [{"from",
    "value"}], "image" or "images", "video" or "videos"}) lines, paths under `root` (a video: a file, a folder of
    frames, or a list of frame images); the last turn (assistant / gpt) is the reference answer, the turns before
    it the prompt. "<image>" / "<video>" marks where each image / video goes (none: before the first user text,
    images then videos). A one-letter reference ("B", "(B)") that the prompt lists as an option ("B. ..." or
    "(B) ..." lines) is multiple choice."""
    path, samples = Path(path), []
    root = Path(root or path.parent)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if max_samples and len(samples) == max_samples:
                break
            if line.strip():
                try:
                    samples.append(jsonl_sample(json.loads(line), root, f"{path} line {n}"))
                except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
                    raise ValueError(f"{path} line {n}: {e}") from None
    return samples


def jsonl_sample(rec: dict, root: Path, where: str) -> Sample:
    turns = rec.get("messages") or rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("no 'messages' (ms-swift) or 'conversations' (LLaVA) list")
    turns = [(t.get("role", t.get("from")), t.get("content", t.get("value"))) for t in turns]
    if not all(r in ROLES and isinstance(text, str) for r, text in turns):
        raise ValueError(f"a turn is not {{role: {'|'.join(ROLES)}, content: text}}: {turns}")
    *turns, (role, ref) = [(ROLES[r], text) for r, text in turns]
    if role != "assistant" or not any(r == "user" for r, _ in turns) or not ref.strip():
        raise ValueError("the last turn must be the reference answer (assistant / gpt) after a user turn")
    images, videos = records.media_fields(rec)  # as training data reads them
    if not records.is_paths(images):
        raise ValueError(f"image / images must be a path or a list of paths, got {images!r}")
    if not records.is_videos(videos):
        raise ValueError(f"video is a path or a list of frame paths, videos a list of them; got {videos!r}")
    files = dict(image=[root / p for p in images],
                 video=[root / v if isinstance(v, str) else [root / f for f in v] for v in videos])
    front = ""  # the unmarked images and videos, before the first user text
    for kind in ("image", "video"):
        if (marks := sum(text.count(f"<{kind}>") for _, text in turns)) == 0:
            front += f"<{kind}>" * len(files[kind])
        elif marks != len(files[kind]):
            raise ValueError(f"{marks} <{kind}> placeholders but {len(files[kind])} {kind}s")
    u = next(i for i, (r, _) in enumerate(turns) if r == "user")
    turns[u] = ("user", front + turns[u][1])
    letter = re.fullmatch(r"\(?([A-Z])\)?\.?", ref.strip())
    options = dict(re.findall(r"^\s*\(?([A-Z])[.)]\s*(.+?)\s*$", turns[-1][1], re.M)) if letter else {}
    if not letter or letter[1] not in options:  # a one-letter answer to an open question ("Which letter ...?")
        options = {}
    refs = [letter[1]] if options else [ref.strip()]
    return Sample(where, str(rec.get("id", where.rsplit(" ", 1)[-1])), turns, files["image"], refs, options,
                  str(rec.get("category", "")), files["video"])


# ----------------------------------------------------------------------------------------------------------------
# prompts, as VLMEvalKit builds them (ImageMCQDataset, ImageVQADataset) with LLaVA's multiple-choice instruction


def mcq_prompt(question: str, options: dict[str, str], hint: str = "") -> str:
    lines = ([f"Hint: {hint}"] if hint else []) + [f"Question: {question}", "Options:"]
    lines += [f"{k}. {v}" for k, v in options.items()]
    cjk = re.search(r"[\u4e00-\u9fff]", "".join(lines))  # Qwen2VLPromptMixin asks in Chinese for Chinese rows
    return "\n".join(lines + ["请直接回答选项字母。" if cjk else
                             "Answer with the option's letter from the given choices directly."])


def vqa_prompt(question: str) -> str:
    return f"{question}\nAnswer the question using a single word or phrase."


# ----------------------------------------------------------------------------------------------------------------
# the driver: prompts through sample.generate in batches, scores, files


def messages_of(turns: list[tuple[str, str]], system: str = "") -> list[dict]:
    """(role, text with <image> / <video> marks) -> sample.build_prompt's messages, an image or video item where
    each mark was; `system` (the chat template's default system prompt) opens a conversation that has none."""
    out = [dict(role="system", content=system)] if system and turns[0][0] != "system" else []
    for role, text in turns:
        items = [dict(type=p[1:-1]) if p in ("<image>", "<video>") else dict(type="text", text=p)
                 for p in re.split(r"(<image>|<video>)", text) if p]
        out.append(dict(role=role, content=items))
    return out


def predict(model, tokenizer, cfgs, samples: list[Sample], cfg: EvalConfig, stop_ids, system: str,
            desc: str) -> list[str]:
    """Greedy answers, `batch_size` prompts at a time, left-padded (the same tokens as one at a time); cfgs: the
    model's (image_cfg, video_cfg)."""
    pad_id = tokenizer.token_to_id("<|endoftext|>") or 0  # any id: the mask hides it
    preds = []
    with tqdm(total=len(samples), desc=desc, unit="sample", file=sys.stderr) as bar:
        for i in range(0, len(samples), cfg.batch_size):
            rows, inputs = [], []
            for s in samples[i : i + cfg.batch_size]:
                try:
                    images = [open_image(x) for x in s.images]
                    videos = [sample.attach("video", p, *cfgs) for p in s.videos]
                    ids, vision = sample.build_prompt(tokenizer, messages_of(s.turns, system), images, cfgs[0],
                                                      videos, cfgs[1])
                except (ValueError, OSError) as e:  # bad base64, a missing file, a file that is not an image / video
                    raise ValueError(f"{s.where}: {e}") from None
                rows.append(ids)
                inputs.append(vision)
            ids, mask = sample.pad_left(rows, pad_id)
            # each input of the rows that have it, row after row: the order of their pads in the left-padded ids
            keys = dict.fromkeys(k for x in inputs for k in x)
            vision = {k: torch.cat([x[k] for x in inputs if k in x]) for k in keys}
            out = sample.generate(model, ids, mask, **vision, max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids,
                                  compile=next(model.parameters()).is_cuda)
            preds += [tokenizer.decode(o) for o in out]
            bar.update(len(rows))
    return preds


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out)
    try:
        stems = [Path(f).stem for f in cfg.data]
        if len(set(stems)) < len(stems) or any(Path(f).suffix not in (".tsv", ".jsonl") for f in cfg.data):
            raise ValueError(f"--data takes .tsv (VLMEvalKit) and .jsonl (LLaVA / ms-swift) files, each with its own "
                             f"name (the predictions file is named after it): {cfg.data}")
        # every file is read first, so that a bad row stops the run before any generation
        datasets = {f: (read_tsv if f.endswith(".tsv") else read_jsonl)(f, cfg.max_samples, cfg.data_root)
                    for f in cfg.data}
        model, tokenizer, image_cfg = weights.load(cfg.model, device, getattr(torch, cfg.dtype), cfg.adapter,
                                                   cfg.max_pixels)
        cfgs = image_cfg, weights.video_config(cfg.model, model.cfg, cfg.fps, cfg.max_frames, cfg.video_max_pixels)
        system = weights.template_defaults(weights.read_chat_template(cfg.model))[0]
        stop_ids = weights.stop_token_ids(cfg.model)
        out.mkdir(parents=True, exist_ok=True)
        summary = dict(config=dataclasses.asdict(cfg), results={})
        for f, samples in datasets.items():
            t0 = time.perf_counter()
            preds = predict(model, tokenizer, cfgs, samples, cfg, stop_ids, system, Path(f).name)
            seconds = time.perf_counter() - t0
            bench = scores.benchmark_of(Path(f).stem)  # the file's name picks its benchmark's protocol
            rows = [scores.score(p, s.refs, s.options, bench, s.category) for p, s in zip(preds, samples)]
            with open(out / f"{Path(f).stem}.jsonl", "w", encoding="utf-8") as fh:
                for s, p, sc in zip(samples, preds, rows):
                    fh.write(json.dumps(dict(index=s.index, category=s.category, prompt=s.turns, prediction=p,
                                             refs=s.refs, **sc), ensure_ascii=False) + "\n")
            result = dict(scores.summarise([dict(index=s.index, category=s.category, **sc)
                                            for s, sc in zip(samples, rows)], bench),
                          seconds=round(seconds, 2), samples_per_s=round(len(samples) / max(seconds, 1e-9), 3))
            summary["results"][f] = result
            print(scores.format_table(result, f))
        (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return summary
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
