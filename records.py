"""Records: dataset files to samples, and every problem with them as file:line (images and lengths are data.py's).

Strict JSON (.json: one array of samples; .jsonl: one a line) in the LLaVA (`conversations`, from/value) or
ms-swift (`messages`, role/content) layout; images are `image` / `images` and videos `video` / `videos`, one per
<image> / <video> placeholder, in order. A video is a file, a folder of frames, or a list of frame images.

    samples, problems = load_samples(files, data_root)   # the well-formed samples; the rest as Problems
    print(describe_problems(problems))                    # counted by kind, then each as file:line: reason
"""
import json
import re
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

IMAGE, VIDEO = "<image>", "<video>"  # the placeholders both formats put where an image or a video goes
FORMATS = {  # a sample's list of turns -> (role key, text key, its roles -> ours)
    "conversations": ("from", "value", {"human": "user", "gpt": "assistant", "system": "system"}),  # LLaVA
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),  # ms-swift
}
SAMPLE_KEYS = {"id", "image", "images", "video", "videos", *FORMATS}


class Problem(typing.NamedTuple):
    where: str  # file:line
    kind: str  # a short fixed phrase, to count problems by
    detail: str = ""

    def __str__(self):
        return f"{self.where}: {self.kind}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class Sample:
    where: str  # file:line, for every message about it
    messages: tuple[tuple[str, str], ...]  # (role, text), role system | user | assistant; <image>, <video> mark
    images: tuple[Path, ...]
    videos: tuple[Path | tuple[Path, ...], ...] = ()  # a file or a folder of frames, or the frames themselves
    tokens: int = 0  # rendered length before any cut to max_length; set by check_dataset
    image_tokens: tuple[int, ...] = ()  # per image; set by check_dataset
    video_tokens: tuple[int, ...] = ()  # per video (its pads); set by check_dataset


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


def media_fields(raw: dict) -> tuple[object, object]:
    """A record's images and videos as lists, as its fields give them: `image` (a path) or `images` (a list);
    `video` (one video) or `videos` (a list). Unchecked: is_paths / is_videos say whether they are well formed."""
    images = raw.get("images", raw.get("image", []))
    return [images] if isinstance(images, str) else images, [raw["video"]] if "video" in raw else raw.get("videos", [])


def is_paths(value) -> bool:
    return isinstance(value, list) and all(isinstance(p, str) and p != "" for p in value)


def is_videos(value) -> bool:
    """A list of videos, each a path (a file or a folder of frames) or a non-empty list of frame paths."""
    return isinstance(value, list) and all(is_paths([v]) or v and is_paths(v) for v in value)


def parse_sample(where: str, raw, root: Path) -> tuple[Sample | None, list[Problem]]:
    """A LLaVA or ms-swift record (FORMATS) as a Sample, or every problem found in it. Images are `image` (a path)
    or `images` (a list), relative to root, one per <image> placeholder, in order; videos likewise `video` (one:
    a path, or a list of its frames) or `videos` (a list of them), one per <video>."""
    if not isinstance(raw, dict):
        return None, [Problem(where, "not an object", f"a sample is a JSON object, not {preview(raw)}")]
    out = []

    def bad(kind, detail=""):
        out.append(Problem(where, kind, detail))

    for key in sorted(raw.keys() - SAMPLE_KEYS):
        bad("unknown field", repr(key))
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
    for one in ("image", "video"):
        if one in raw and one + "s" in raw:
            bad("conflicting fields", f"`{one}` and `{one}s`: use one")
    paths, videos = media_fields(raw)
    if not is_paths(paths):
        bad("bad field", f"images must be a path or a list of paths, not {preview(paths)}")
    if not is_videos(videos):
        bad("bad field", f"`video` is a path or a list of frame paths, `videos` a list of them, not {preview(videos)}")
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
        elif role != "user" and (mark := IMAGE if IMAGE in text else VIDEO if VIDEO in text else None):
            bad(f"misplaced {mark}", f"in turn {k} ({role}); {mark[1:-1]}s go in user turns")
    for mark, given, what in ((IMAGE, paths, "image"), (VIDEO, videos, "video")):
        if (n := sum(text.count(mark) for _, text in messages)) != len(given):
            bad(f"{what} count mismatch", f"{n} {mark} placeholder(s) but {len(given)} {what}(s)")
    if out:
        return None, out
    videos = [root / v if isinstance(v, str) else tuple(root / f for f in v) for v in videos]
    return Sample(where, tuple(messages), tuple(root / p for p in paths), tuple(videos)), []


def load_samples(files, data_root: str = "") -> tuple[list[Sample], list[Problem]]:
    """Every well-formed sample of the files, in order, and the problems of the rest (JSON and structure only:
    images, videos and lengths are data.check_dataset's)."""
    samples, problems = [], []
    for f in map(Path, files):
        records, bad = read_records(f)
        problems += bad or ([] if records else [Problem(f"{f}:0", "empty dataset", "the file holds no samples")])
        for where, raw in records:
            s, bad = parse_sample(where, raw, Path(data_root) if data_root else f.parent)
            problems += bad
            samples += [s] if s else []
    return samples, problems


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

