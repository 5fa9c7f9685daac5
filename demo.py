"""The whole recipe, offline, on a CPU, in minutes: what nanoGPT's Shakespeare run is for a GPT.

    python demo.py [--out out/demo] [--quick]

1. A tiny world: 64x64 pictures of one to four identical shapes (4 colours x 3 kinds) in the cells of a 2x2
   grid, with questions (which colour? which shape? how many? where? describe it) and answers, and 2-second clips
   of one shape that moves, appears or turns another colour (what happens? which way? what colour does it turn?
   where does it appear?), .mp4 files and folders of frames; train and held-out.
2. A byte-level BPE tokenizer trained on the world's words, with Qwen's special tokens and a ChatML template.
3. Two donors, trained from random init by train.py and saved in HF layouts like the real ones:
   donor-vl, a tiny Qwen3-VL that learns the questions from the pixels (its vision tower is the part we take), and
   donor-llm, a tiny Qwen3 of another width that never sees a picture: it learns the same questions with the
   picture or clip described in words, so it knows the answers as soon as something tells it what it shows.
4. The recipe on them: convert.py assemble -> train.py stage 1 (only the fresh merger learns: to tell the frozen
   LLM what the frozen vision tower sees) -> stage 2 (everything learns) -> eval.py on the held-out pictures and
   clips after each -> sample.py on one of each. Each directory is what the next step reads, as with real
   checkpoints.
Out: the table of wall times and held-out accuracies, results.json, loss.png (every run's loss curve), sample.txt.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import cli
import convert
import eval as evaluate  # eval.py (the name `eval` is Python's builtin)
import model as M
import pixels
import sample
import train
import weights
from merger import PatchMerger


@dataclass
class DemoConfig:
    out: str = "out/demo"
    quick: bool = False  # a few steps of everything: checks that the pipeline runs, learns nothing (the test)
    n_train: int = 3000  # training pictures
    n_heldout: int = 120  # held-out pictures, each asked every question that applies to it
    n_clips: int = 3000  # training clips
    n_heldout_clips: int = 120  # held-out clips, each asked its two questions
    # the vision donor learns to see from scratch: the longest run (4 rows a step). The pictures take ~1000 steps;
    # telling a move from a change of colour, which needs the two halves of a clip compared, takes ~1500.
    vision_steps: int = 1500
    llm_steps: int = 200  # the LLM donor (8 rows of 512 tokens a step, as the stages)
    stage1_steps: int = 200
    stage2_steps: int = 300  # the new LLM learns to compare a clip's halves here (at 200: "what happens?" 75%)
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# 1. the world

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # the 2x2 grid, row by row
NUMBERS = ("zero", "one", "two", "three", "four")
SIZE = 64  # with Qwen3-VL's 16-pixel patches: a 4x4 patch grid, merged 2x2 into 4 LLM tokens (one per cell)
QUESTIONS = {"colour": "Which colour do you see?", "shape": "Which shape do you see?",
             "count": "How many shapes are there?", "position": "Where is the shape?",
             "describe": "Describe the picture."}
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "count": 1 / 4, "position": 1 / len(CELLS),
          "describe": 1 / (len(COLOURS) * len(SHAPES) * 15)}  # uniform guessing; 15 non-empty sets of cells
# Clips: 2 seconds of one shape that moves across the frame, appears, or turns another colour. Sampled at 2 frames
# a second (the donor's video setting), a clip is 4 frames: 2 temporal patches of 2 frames, each 4 LLM tokens
# behind its "<t seconds>" (Qwen3-VL's layout). Half are .mp4 files (H.264, lossy) the sampler thins from 16
# frames, half folders of 4 PNG frames. (With 3-second clips, 3 patches that each hold less of the motion, the
# vision donor learnt "which way?" alone in 300 steps rather than 200.)
EVENTS = ("moves", "appears", "turns")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_QUESTIONS = {"event": "What happens?", "direction": "Which way does the shape move?",
                   "turn": "What colour does it turn?", "appear": "Where does the shape appear?"}
VIDEO_CHANCE = {"event": 1 / (len(DIRECTIONS) + len(COLOURS) + len(CELLS)),  # "it moves left", "it turns red", ...
                "direction": 1 / len(DIRECTIONS), "turn": 1 / len(COLOURS), "appear": 1 / len(CELLS)}
CLIPS = {".mp4": (16, 8), "": (4, 2)}  # file suffix (none: a folder of frames) -> (frames, frames a second)
# Qwen3-VL's pixel bound is on all of a clip's frames together: up to 8 frames of 64x64 stay 64x64
VIDEO = pixels.VideoConfig(patch_size=16, min_pixels=4 * 32 * 32, max_pixels=8 * SIZE * SIZE, image_mean=(0.5,) * 3,
                           image_std=(0.5,) * 3, text_timestamps=True, do_sample_frames=True, fps=2.0, max_frames=8)


def describe(colour: str, shape: str, cells: list[int]) -> str:
    """'two red circles at the top left and the bottom right': the text the LLM donor reads instead of pixels."""
    where = [f"the {CELLS[c]}" for c in cells]
    where = "in all four corners" if len(cells) == 4 else "at " + (
        where[0] if len(where) == 1 else ", ".join(where[:-1]) + " and " + where[-1])
    return f"{NUMBERS[len(cells)]} {colour} {shape}{'s' if len(cells) > 1 else ''} {where}"


def answers(colour: str, shape: str, cells: list[int]) -> dict[str, str]:
    out = dict(colour=colour, shape=shape, count=str(len(cells)), describe=describe(colour, shape, cells))
    if len(cells) == 1:  # "where?" only makes sense for one shape
        out["position"] = f"at the {CELLS[cells[0]]}"  # the words describe() uses
    return out


def paint(pen: ImageDraw.ImageDraw, shape: str, x: int, y: int, r: int, fill: tuple) -> None:
    if shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        pen.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def jitter(colour: str, rng: np.random.Generator) -> tuple:
    return tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255))


def in_cell(c: int, r: int, rng: np.random.Generator) -> tuple[int, int]:
    """A random centre for a shape of half-size r inside cell c."""
    return (c % 2) * 32 + int(rng.integers(r + 1, 32 - r)), (c // 2) * 32 + int(rng.integers(r + 1, 32 - r))


def draw(colour: str, shape: str, cells: list[int], rng: np.random.Generator) -> Image.Image:
    """Each shape of random size and place inside its 32x32 cell, its colour jittered, on a noisy background."""
    img = Image.fromarray(rng.normal(235, 12, (SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(img)
    for c in cells:
        r = int(rng.integers(10, 15))  # half the shape's size
        paint(pen, shape, *in_cell(c, r, rng), r, jitter(colour, rng))
    return img


def film(clip: dict, frames: int, fps: float, rng: np.random.Generator) -> np.ndarray:
    """(frames, 64, 64, 3) uint8 on a still noisy background. A moving shape crosses from one half of the frame to
    the other over the whole clip (about 10 pixels between sampled frames); appearing and turning happen at a
    random moment in the middle third, so that sampled frames show before and after."""
    still = rng.normal(235, 12, (SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8)
    r = int(rng.integers(10, 15))
    if clip["event"] == "appears":
        x, y = in_cell(CELLS.index(clip["detail"].removeprefix("at the ")), r, rng)
    else:
        x, y = (int(v) for v in rng.integers(r + 1, SIZE - r, 2))
    fills = jitter(clip["colour"], rng), jitter(clip["detail"] if clip["event"] == "turns" else clip["colour"], rng)
    when = rng.uniform(1 / 3, 2 / 3) * frames / fps  # seconds
    a, b = r + 1 + int(rng.integers(0, 6)), SIZE - 1 - r - int(rng.integers(0, 6))  # where a move starts and ends
    dx, dy = DIRECTIONS.get(clip["detail"], (0, 0))
    out = []
    for i in range(frames):
        img = Image.fromarray(still)
        t, along = i / fps, i / (frames - 1)
        if clip["event"] == "moves":  # along its axis from a to b (or b to a), the other coordinate kept
            p = round(a + (b - a) * along if dx + dy > 0 else b - (b - a) * along)
            x, y = (p, y) if dx else (x, p)
        if clip["event"] != "appears" or t >= when:
            paint(ImageDraw.Draw(img), clip["shape"], x, y, r, fills[clip["event"] == "turns" and t >= when])
        out.append(np.array(img))
    return np.stack(out)


def save_clip(frames: np.ndarray, fps: int, path: Path) -> None:
    """An .mp4 (H.264 through PyAV: lossy, as a camera's; colours shift a little) or a folder of PNG frames."""
    if path.suffix == ".mp4":
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.height, stream.width, stream.pix_fmt = SIZE, SIZE, "yuv420p"
            for f in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(stream.encode())  # flush the encoder
    else:
        path.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(path / f"{i:02d}.png")


def timestamps(video: str) -> str:
    """The "<t seconds>" of a clip's prompt (Qwen3-VL's per-pair timestamps), for the tokenizer to learn."""
    frames, fps = CLIPS[Path(video).suffix]
    indices = pixels.video_indices(frames, fps, VIDEO, frames_given=not Path(video).suffix)
    return pixels.video_text(pixels.frame_timestamps(indices, fps), "", "", "")


def clip_answers(clip: dict) -> dict[str, str]:
    """What happens ("it moves left", "it turns blue", "it appears at the top left"), and the event's detail."""
    kind = {"moves": "direction", "turns": "turn", "appears": "appear"}[clip["event"]]
    return {"event": f"it {clip['event']} {clip['detail']}", kind: clip["detail"]}


def conversations(chats: list[list[tuple[str, str]]], ask: dict[str, str], split: str, media: dict, mark: str,
                  words: str) -> tuple[list[dict], list[dict]]:
    """ms-swift rows of these chats of (kind, answer) about one picture or clip: for the VLM (`mark`, <image> or
    <video>, before the first question; `media` its field) and for the LLM donor (`words` there instead). A
    held-out chat asks one question, its row tagged with its kind as `category` (eval.py scores per category)."""
    vlm, llm = [], []
    for chat in chats:
        turns = [t for kind, answer in chat for t in (dict(role="user", content=ask[kind]),
                                                      dict(role="assistant", content=answer))]
        tag = dict(category=chat[0][0]) if split == "heldout" else {}
        for rows, first, extra in ((vlm, mark, media), (llm, words, {})):
            rows.append(dict(messages=[dict(role="user", content=first + turns[0]["content"])] + turns[1:],
                             **extra, **tag))
    return vlm, llm


def make_world(root: Path, cfg: DemoConfig) -> dict[str, Path]:
    """Pictures under root/images, clips under root/clips, and eight ms-swift jsonl files: train / heldout ask
    about the pictures, train_video / heldout_video about the clips, and llm_* ask the same with the picture or
    clip described in words (for the LLM donor). A training picture gets two conversations: the short questions in
    random order, and "describe": in one chat its answer ("two red circles ...") would give the others away, and a
    model would learn to copy it instead of looking at the picture. A clip gets two, one question each, as the
    held-out clips are asked: in one chat, "which way does it move?" would give "what happens?" away."""
    rng = np.random.default_rng(cfg.seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = [p + s + v for p in ("", "llm_") for s in ("train", "heldout") for v in ("", "_video")]
    lines = {name: [] for name in names}
    for i in range(cfg.n_train + cfg.n_heldout):
        split = "train" if i < cfg.n_train else "heldout"
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        cells = sorted(rng.choice(4, size=int(rng.integers(1, 5)), replace=False).tolist())
        image = f"images/{split}_{i:05d}.png"
        draw(colour, shape, cells, rng).save(root / image)
        qa = list(answers(colour, shape, cells).items())
        if split == "train":
            rng.shuffle(qa)
            chats = [[q for q in qa if q[0] != "describe"], [q for q in qa if q[0] == "describe"]]
        vlm, llm = conversations(chats if split == "train" else [[q] for q in qa], QUESTIONS, split,
                                 dict(images=[image]), "<image>", f"Picture: {describe(colour, shape, cells)}.\n")
        lines[split] += vlm
        lines["llm_" + split] += llm
    rng = np.random.default_rng([cfg.seed, 1])  # the clips' own stream: the pictures stay as they were
    (root / "clips").mkdir(exist_ok=True)
    for i in range(cfg.n_clips + cfg.n_heldout_clips):
        split = "train" if i < cfg.n_clips else "heldout"
        event = str(rng.choice(EVENTS))
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        if event == "moves":
            detail = str(rng.choice(list(DIRECTIONS)))
        elif event == "turns":
            detail = str(rng.choice([c for c in COLOURS if c != colour]))
        else:
            detail = f"at the {rng.choice(CELLS)}"
        clip = dict(event=event, colour=colour, shape=shape, detail=detail)
        suffix = list(CLIPS)[i % 2]
        video = f"clips/{split}_{i:05d}{suffix}"
        save_clip(film(clip, *CLIPS[suffix], rng), CLIPS[suffix][1], root / video)
        qa = list(clip_answers(clip).items())
        vlm, llm = conversations([[q] for q in qa], VIDEO_QUESTIONS, split,
                                 dict(videos=[video]), "<video>", f"Clip: a {colour} {shape} {event} {detail}.\n")
        lines[split + "_video"] += vlm
        lines[f"llm_{split}_video"] += llm
    for name, rows in lines.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {name: root / f"{name}.jsonl" for name in lines}


# ----------------------------------------------------------------------------------------------------------------
# 2. the tokenizer: Qwen's pipeline and special tokens, trained on our small world

# transformers' Qwen2Tokenizer pre-tokenizer regex (Qwen's tokenizer.json)
PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # Qwen's order (151643...), here from id 0
# Qwen3-VL-Instruct's template without tools: ChatML, an image item is <|vision_start|><|image_pad|><|vision_end|>
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for item in message.content %}"
    "{%- if item.type == 'image' or 'image' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def make_tokenizer(texts: list[str], out: Path, vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(  # the special tokens first: ids 0..13
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])  # never split
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                           single_word=False, special=True) for t in SPECIAL}
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        added_tokens_decoder=added, bos_token=None, chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=1024, split_special_tokens=False,
        tokenizer_class="Qwen2Tokenizer", unk_token=None, errors="replace"), indent=2) + "\n")
    return tok


# ----------------------------------------------------------------------------------------------------------------
# 3. the donors: HF config.json dicts written by hand, our VLM built on them, initialised, saved, trained


def donor_configs(tok: Tokenizer) -> tuple[dict, dict]:
    """config.json of a tiny Qwen3-VL (Qwen3VLForConditionalGeneration) and of a tiny Qwen3 (Qwen3ForCausalLM) of
    another width. Their head_dim agrees: the assembled model keeps the vision donor's M-RoPE sections (6+5+5 of
    head_dim/2 = 16 frequencies; Qwen3-VL-8B has 24+20+20 of 64)."""
    ids = {k: tok.token_to_id(t) for k, t in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                                              ("vision_start_token_id", "<|vision_start|>"),
                                              ("vision_end_token_id", "<|vision_end|>"))}
    vocab = 64 * math.ceil(tok.get_vocab_size() / 64)
    common = dict(vocab_size=vocab, head_dim=32, hidden_act="silu", rms_norm_eps=1e-6, attention_bias=False,
                  max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=tok.token_to_id("<|im_end|>"))
    vl = dict(architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl", **ids,
              tie_word_embeddings=True, dtype="float32",
              text_config=dict(model_type="qwen3_vl_text", hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                               num_attention_heads=3, num_key_value_heads=1, **common,
                               rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                    mrope_section=[6, 5, 5], mrope_interleaved=True)),
              vision_config=dict(model_type="qwen3_vl", depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                                 hidden_act="gelu_pytorch_tanh", patch_size=16, temporal_patch_size=2,
                                 spatial_merge_size=2, in_channels=3, out_hidden_size=96,  # = its LLM's width
                                 num_position_embeddings=16, deepstack_visual_indexes=[0]))
    llm = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=128, intermediate_size=384,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
               dtype="float32", **common)
    return vl, llm


@torch.no_grad()
def init_weights(model: M.VLM, seed: int) -> None:
    """As transformers initialises Qwen models (initializer_range 0.02): normal weights, zero biases, unit norms;
    the mergers by their own init_weights. One exception, the vision tower's position table (below)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, PatchMerger):
            module.init_weights()
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv3d)):
            torch.nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
        elif hasattr(module, "weight") and module.weight.dim() == 1:  # RMSNorm, LayerNorm
            torch.nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
    if model.visual is not None:
        # A real tower's features say where each patch is. A 2-minute one would not learn that: its own LLM reads
        # where from the image tokens' 3-D positions, which a new LLM cannot (stage 1 then got "where?" at chance,
        # stage 2 anywhere from 55% to 100%). Starting the position table as loud as the pixels keeps it.
        torch.nn.init.normal_(model.visual.pos_embed.weight, std=0.5)


def make_donor(hf: dict, tok_dir: Path, out: Path, seed: int) -> None:
    """A randomly initialised model dir in HF layout: config.json, model.safetensors, tokenizer, generation config
    and, for the VL one, the image and video preprocessing (64x64 pictures and frames stay 64x64)."""
    model = M.VLM(M.config_from_hf(hf))
    init_weights(model, seed)
    weights.save_state_dict(model.state_dict(), out, hf)
    weights.copy_model_files(tok_dir, out)
    eos = hf.get("text_config", hf)["eos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(dict(eos_token_id=[eos], do_sample=False)) + "\n")
    if "vision_config" in hf:
        pixels.save_image_config(pixels.ImageConfig(patch_size=16, min_pixels=32 * 32, max_pixels=SIZE * SIZE,
                                                image_mean=(0.5,) * 3, image_std=(0.5,) * 3), out)
        pixels.save_video_config(VIDEO, out)


# ----------------------------------------------------------------------------------------------------------------
# 4. the recipe: each step is the command line it prints, run in this process


def run_train(title: str, **settings) -> Path:
    """python train.py with these settings, into a fresh --out (train.py refuses one that holds an earlier run)."""
    settings = dict(stage=2, dtype="float32", max_length=512, batch_size=8, warmup_steps=10, epochs=100) | settings
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
                     for k, v in settings.items())
    print(f"\n== {title}\n$ python train.py {flags}", flush=True)
    shutil.rmtree(settings["out"], ignore_errors=True)
    train.main(train.TrainConfig(**settings))
    return Path(settings["out"])


def run_eval(model_dir: Path, pictures: Path, clips: Path) -> dict[str, float]:
    """python eval.py on the held-out pictures and clips: exact match of the greedy answers, overall per file
    (`image`, `video`) and per kind of question."""
    argv = ["--model", str(model_dir), "--data", str(pictures), str(clips), "--out",
            str(model_dir.parent / "eval" / model_dir.name), "--dtype", "float32", "--batch-size", "64",
            "--max-new-tokens", "24"]
    print(f"$ python eval.py {shlex.join(argv)}", flush=True)
    results = evaluate.main(argv)["results"]

    def em(r):  # eval.py reports percent, each number with its protocol
        return r["scores"]["exact_match"]["value"] / 100
    accuracy = {}
    for name, f in (("image", pictures), ("video", clips)):
        accuracy[name] = em(results[str(f)])
        accuracy |= {k: em(v) for k, v in results[str(f)]["per_category"].items()}
    return accuracy


def ask(model_dir: Path, heldout: Path, kind: str) -> str:
    """python sample.py on the first held-out picture (kind "image") or clip ("video"), once for each question."""
    rows = [json.loads(line) for line in open(heldout)]
    lines, media = [], kind + "s"
    for row in (r for r in rows if r[media] == rows[0][media]):
        question, truth = (m["content"].removeprefix(f"<{kind}>") for m in row["messages"])
        argv = ["--model", str(model_dir), f"--{kind}", str(heldout.parent / row[media][0]), "--prompt", question,
                "--dtype", "float32"]
        with contextlib.redirect_stdout(io.StringIO()) as said:
            sample.main(argv)
        lines.append(f"$ python sample.py {shlex.join(argv)}\n{said.getvalue().strip()}    (truth: {truth})")
    return "\n".join(lines)


def draw_losses(runs: dict[str, Path], captions: dict[str, str], file: Path) -> None:
    """Training loss per answer token (log scale) against step, one panel per run, from each run's log.jsonl."""
    curves = {name: [json.loads(line)["loss"] for line in open(d / "log.jsonl")] for name, d in runs.items()}
    values = [v for c in curves.values() for v in c]
    lo, hi = math.floor(math.log10(max(min(values), 1e-4))), math.ceil(math.log10(max(values)))
    W, H, (left, top, right, bottom) = 460, 270, (50, 40, 15, 40)  # a panel and its margins
    img = Image.new("RGB", (2 * W, H * math.ceil(len(curves) / 2)), "white")
    pen, font = ImageDraw.Draw(img), ImageFont.load_default(13)
    for k, (name, losses) in enumerate(curves.items()):
        x0, y0, x1, y1 = (k % 2) * W + left, (k // 2) * H + top, (k % 2 + 1) * W - right, (k // 2 + 1) * H - bottom

        def y(v: float) -> float:
            return y0 + (y1 - y0) * (hi - math.log10(max(v, 10**lo))) / max(hi - lo, 1)

        for e in range(lo, hi + 1):  # a grid line per decade
            pen.line([(x0, y(10**e)), (x1, y(10**e))], fill=(225, 225, 225))
            pen.text((x0 - 6, y(10**e)), f"1e{e}", fill="black", font=font, anchor="rm")
        pen.rectangle([x0, y0, x1, y1], outline="black")
        points = [(x0 + (x1 - x0) * i / max(len(losses) - 1, 1), y(v)) for i, v in enumerate(losses)]
        pen.line(points, fill=(31, 119, 180), width=1)
        pen.text((x0, y0 - 8), f"{name}: {captions.get(name, '')}", fill="black", font=font, anchor="ld")
        pen.text(((x0 + x1) / 2, y1 + 20), f"step (of {len(losses)}); loss per answer token", fill="black",
                 font=font, anchor="mm")
    img.save(file)


def main(argv: list[str] | None = None) -> dict:
    cfg = cli.parse(DemoConfig, argv, __doc__)
    if cfg.quick:
        cfg = dataclasses.replace(cfg, n_train=48, n_heldout=6, n_clips=16, n_heldout_clips=6, vision_steps=3,
                                  llm_steps=3, stage1_steps=3, stage2_steps=3)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    rows, runs, clock = {}, {}, [time.perf_counter()]

    def done(step: str, accuracy: dict | None = None) -> None:  # one row of the final table
        rows[step] = dict(seconds=round(time.perf_counter() - clock[0], 1), accuracy=accuracy)
        clock[0] = time.perf_counter()

    print(f"== 1. the world: {cfg.n_train} training and {cfg.n_heldout} held-out pictures, {cfg.n_clips} and "
          f"{cfg.n_heldout_clips} clips -> {out / 'data'}")
    shutil.rmtree(out / "data", ignore_errors=True)
    files = make_world(out / "data", cfg)
    print("== 2. the tokenizer")
    words = [m["content"] for f in ("llm_train", "llm_train_video") for line in open(files[f])
             for m in json.loads(line)["messages"]]
    words += [timestamps(json.loads(line)["videos"][0]) for line in open(files["train_video"])]
    tok = make_tokenizer(["system", "user", "assistant"] + words, out / "tokenizer")
    print(f"{tok.get_vocab_size()} tokens; 'two red circles' -> {tok.encode('two red circles').tokens}")
    vl, llm = donor_configs(tok)
    for name, hf in (("vl", vl), ("llm", llm)):  # random init: where the donors' training starts
        shutil.rmtree(out / "init" / name, ignore_errors=True)
        make_donor(hf, out / "tokenizer", out / "init" / name, cfg.seed)
    done("world + tokenizer")

    seen = [str(files["train"]), str(files["train_video"])]  # what the VLMs train on: pictures and clips
    heldout = files["heldout"], files["heldout_video"]
    # Learning rates: tiny models learn fastest near 1e-3 (train.py's default 1e-4 is for real checkpoints); from
    # scratch, higher makes the vision donor stall on some questions. The fresh merger alone takes 2e-3.
    runs["vision donor"] = run_train(
        "3. the vision donor: a tiny Qwen3-VL learns the questions from the pixels of pictures and clips",
        model=str(out / "init" / "vl"), data=seen, out=str(out / "donor-vl"),
        lr=1e-3, max_steps=cfg.vision_steps, batch_size=4, seed=cfg.seed)
    done("vision donor", run_eval(out / "donor-vl", *heldout))
    runs["LLM donor (words)"] = run_train(
        "4. the LLM donor: a tiny Qwen3 learns the same questions with the pictures and clips described in words",
        model=str(out / "init" / "llm"), data=[str(files["llm_train"]), str(files["llm_train_video"])],
        out=str(out / "donor-llm"), lr=1e-3, max_steps=cfg.llm_steps, seed=cfg.seed)
    done("LLM donor (words)", run_eval(out / "donor-llm", files["llm_heldout"], files["llm_heldout_video"]))

    argv = ["assemble", "--vision", str(out / "donor-vl"), "--llm", str(out / "donor-llm"),
            "--out", str(out / "assembled"), "--dtype", "float32", "--seed", str(cfg.seed), "--force"]
    print(f"\n== 5. assemble: donor-vl's vision tower + a fresh merger + donor-llm\n"
          f"$ python convert.py {shlex.join(argv)}")
    convert.main(argv)
    done("assembled", run_eval(out / "assembled", *heldout))
    runs["stage 1"] = run_train(
        "6. stage 1: only the fresh merger learns; vision tower and LLM frozen",
        model=str(out / "assembled"), data=seen, out=str(out / "stage1"), stage=1,
        lr=2e-3, max_steps=cfg.stage1_steps, seed=cfg.seed)
    done("stage 1", run_eval(out / "stage1", *heldout))
    runs["stage 2"] = run_train(
        "7. stage 2: everything learns",
        model=str(out / "stage1"), data=seen, out=str(out / "stage2"), stage=2,
        lr=1e-3, max_steps=cfg.stage2_steps, seed=cfg.seed)
    done("stage 2", run_eval(out / "stage2", *heldout))

    print("\n== 8. sample: the questions about a held-out picture and a held-out clip")
    said = ask(out / "stage2", files["heldout"], "image") + "\n" + ask(out / "stage2", files["heldout_video"], "video")
    print(said)
    (out / "sample.txt").write_text(said + "\n")
    draw_losses(runs, {k: "held-out {image:.1%} pictures, {video:.1%} clips".format(**rows[k]["accuracy"])
                       for k in runs}, out / "loss.png")
    done("sample + loss.png")

    kinds = ["image", *QUESTIONS, "video", *VIDEO_QUESTIONS]
    chance = dict(CHANCE, **VIDEO_CHANCE)
    for name, f in (("image", files["heldout"]), ("video", files["heldout_video"])):  # guessing, row by row
        asked = [json.loads(line)["category"] for line in open(f)]
        chance[name] = sum(chance[k] for k in asked) / len(asked)
    print(f"\n{'step':<20}{'wall s':>7}   held-out exact match: pictures, each kind; clips, each kind\n{'':<30}"
          + "".join(f"{k:>10}" for k in kinds))
    print(f"{'(chance: guessing)':<30}" + "".join(f"{chance[k]:>10.1%}" for k in kinds))
    for step, row in rows.items():
        acc = row["accuracy"] or {}
        print(f"{step:<20}{row['seconds']:>7.1f}   " + "".join(f"{acc[k]:>10.1%}" if k in acc else " " * 10
                                                            for k in kinds if acc))
    print(f"{'total':<20}{sum(r['seconds'] for r in rows.values()):>7.1f}\nloss curves: {out / 'loss.png'}")
    result = dict(steps=rows, chance=chance, loss_png=str(out / "loss.png"), sample=str(out / "sample.txt"))
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
