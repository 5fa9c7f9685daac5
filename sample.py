"""Sampling from a model dir: one prefill pass over text, images and videos, then one token at a time from a
preallocated KV cache. Streams to the terminal, or is called as a library (eval.py batches prompts through `generate`).

    python sample.py --model DIR --image x.jpg [--image y.jpg ...] --prompt "Describe the image."
    python sample.py --model DIR --video clip.mp4 [--fps 1 --max-frames 16] --prompt "What happens?"
    python sample.py --model DIR             # no --prompt: a multi-turn chat; `/image PATH`, `/video PATH` attach

The library, for eval.py and notebooks (the model dir itself is weights.py's: weights.load, stop_token_ids):
    ids, vision = build_prompt(tokenizer, messages, images, image_cfg, videos, video_cfg)  # vision: model inputs
    rows = generate(model, input_ids (B, T) left-padded, attention_mask (B, T) | None, **vision, max_new_tokens=...)
    input_ids, attention_mask = pad_left(rows: list[list[int]], pad_id)

Numerics: --dtype float32 gives transformers' generate(do_sample=False) tokens (tests/test_sample.py). bfloat16,
the default and the checkpoints' dtype, halves the weight bytes each decoded token reads, which sets batch-1
speed; on CPU weights.load packs the decoder's bf16 weights in oneDNN's layout (PackedLinear: the same numbers).
The KV cache is in the model's dtype; logits are sampled in fp32. bench/sample_speed.py: against transformers.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from tokenizers import Tokenizer

import cli
import model as M
import pixels
import weights


@dataclass
class SampleConfig:
    model: str = ""  # HF-layout model dir: config.json, safetensors, tokenizer.json (+ preprocessor_config.json);
    # default: the demo's stage-2 model (`python demo.py` makes it)
    image: list[str] = field(default_factory=list)  # images for the (first) user turn, in order
    video: list[str] = field(default_factory=list)  # videos for it, after the images: a file, or a folder of frames
    prompt: str = ""  # "" = a chat in a terminal, else the prompt is read from stdin
    chat: bool = False  # a chat even when stdin is not a terminal (turns and /commands a line each)
    system: str = ""  # "" = the chat template's default (Qwen2.5-VL: "You are a helpful assistant."; Qwen3: none)
    max_new_tokens: int = 512  # the answer stops here at the latest
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens up to this mass
    top_k: int = 0  # 0 = no top-k cut
    seed: int = 0  # of the sampling (temperature > 0)
    max_pixels: int = 0  # 0 = the model dir's preprocessor setting; lower it to spend fewer tokens per image
    fps: float = 0  # video frames sampled a second (a folder's: taken at); 0 = the model dir's video setting
    max_frames: int = 0  # at most this many frames a video; 0 = the model dir's video setting
    video_max_pixels: int = 0  # 0 = the model dir's; lower = fewer tokens a video (Qwen2.5-VL: per frame, 3-VL: all)
    adapter: str = ""  # a PEFT LoRA adapter dir (train.py --lora-rank's --out, or PEFT's), merged when loaded
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # float32: exactly transformers' greedy tokens
    device: str = ""  # "" = cuda if available, else cpu
    compile: bool = True  # torch.compile the decode step (CUDA only; on CPU the step is bound by weight reads)

    def __post_init__(self):
        cli.at_least(self, 1, "max_new_tokens")
        cli.at_least(self, 0, "temperature", "top_k", "max_pixels", "fps", "max_frames", "video_max_pixels")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be within (0, 1]")


def parse_args(argv=None) -> SampleConfig:
    return cli.parse(SampleConfig, argv, __doc__)


# ----------------------------------------------------------------------------------------------------------------
# prompts: Qwen's ChatML, each image or video a <|vision_start|> <|image_pad|> / <|video_pad|> ... <|vision_end|> block

START, END = "<|vision_start|>", "<|vision_end|>"
ITEM = re.compile(r"<\|vision_start\|><\|(image|video)_pad\|><\|vision_end\|>")  # the template's, one per item


def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """ChatML text of a conversation as Qwen's chat templates write it, an ITEM per image or video item (a
    default system prompt is the caller's: see weights.template_defaults)."""
    text = ""
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = "".join(f"{START}<|{item['type']}_pad|>{END}" if item.get("type") in ("image", "video")
                              else item.get("text", "") for item in content)
        text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def build_prompt(tokenizer: Tokenizer, messages: list[dict], images: Sequence = (), image_cfg=None,
                 videos: Sequence = (), video_cfg=None) -> tuple[list[int], dict]:
    """(ids, vision): the conversation's token ids ready for the answer, and the model's image / video inputs.

    messages: [{"role", "content": str | [{"type": "image" | "video"} or {"type": "text", "text"}, ...]}, ...];
    images (PIL) and videos (pixels.load_video's), one per item of their kind, in order. As the processors do, each
    item's pad is expanded to its grid's tokens before tokenising: an image or a Qwen2.5-VL video is one block of
    t*h*w / merge^2 pads; a Qwen3-VL video, per frame pair, "<t seconds>" + a block of h*w / merge^2."""
    text, vision = render(messages), {}
    kinds = [m[1] for m in ITEM.finditer(text)]
    for kind, items, cfg in (("image", images, image_cfg), ("video", videos, video_cfg)):
        if kinds.count(kind) != len(items):
            raise ValueError(f"the messages have {kinds.count(kind)} {kind} items but {len(items)} {kind}s were given")
        if items and cfg is None:
            raise ValueError(f"this model cannot take {kind}s: a text-only LLM"
                             + (", or no video_token_id in its config.json" if kind == "video" else ""))
    if images:
        vision.update(zip(("pixel_values", "image_grid_thw"), pixels.preprocess_images(list(images), image_cfg)))
    if videos:
        pv, grids = zip(*(pixels.preprocess_video(v.frames, video_cfg) for v in videos))
        vision.update(pixel_values_videos=torch.cat(pv), video_grid_thw=torch.cat(grids))
        if not video_cfg.text_timestamps:  # Qwen2.5-VL's time is in M-RoPE: seconds per temporal patch
            vision["second_per_grid_ts"] = torch.tensor([v.second_per_grid(video_cfg) for v in videos])
    grids = {k: iter(vision[f"{k}_grid_thw"].tolist()) for k in ("image", "video") if f"{k}_grid_thw" in vision}
    stamps = iter([v.timestamps(video_cfg) if video_cfg.text_timestamps else None for v in videos])

    def tokens(m: re.Match) -> str:  # one item's text: transformers 5.23 Qwen*Processor.replace_image/video_token
        kind, cfg = m[1], image_cfg if m[1] == "image" else video_cfg
        (t, h, w), times = next(grids[kind]), next(stamps) if kind == "video" else None
        per_block = h * w // cfg.merge_size**2 * (1 if times else t)  # times: a block per frame pair, else one
        return pixels.video_text(times, f"<|{kind}_pad|>" * per_block, START, END)

    return tokenizer.encode(ITEM.sub(tokens, text), add_special_tokens=False).ids, vision


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (input_ids, attention_mask) (B, T), padded on the left so that every
    row's next token is generated at the same column."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows], dtype=torch.long)
    return ids, torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# generation


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """(B, vocab) fp32 logits -> (B,) next tokens: argmax at temperature 0, else a sample after temperature,
    top-k and top-p (nucleus) cuts, in transformers' order."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:  # keep the k largest (and anything tied with the k-th)
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the most likely tokens until their probability mass reaches top_p (at least one)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        drop[:, 0] = False  # top_p <= 0 still leaves the most likely token, as in transformers
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def decode_step(model: M.VLM, tokens, cache: M.KVCache, mask, positions=None, slot=None) -> torch.Tensor:
    """tokens (B, 1) -> next-token logits (B, vocab) fp32, its keys and values written into the cache in place.
    Eager: positions and slot follow from the cache (mask: the slots so far). Compiled: the static cache, mask
    (B, slots), positions (B, 1) and slot (1,) passed in, so every shape is fixed for a whole generation: one
    graph (a CUDA graph on CUDA) per batch size and cache size."""
    return model(tokens, attention_mask=mask, position_ids=positions, cache=cache, cache_position=slot)[:, -1].float()


@functools.cache
def compiled_decode_step(cuda: bool):
    """decode_step through torch.compile, made once per process; on CUDA as CUDA graphs (reduce-overhead): one
    replay a token instead of ~600 kernel launches from Python."""
    return torch.compile(decode_step, mode="reduce-overhead" if cuda else None, dynamic=False, fullgraph=True)


@functools.cache
def static_cache(cfg: M.TextConfig, batch_size: int, slots: int, device: torch.device, dtype: torch.dtype):
    """One static KV cache per shape for the process, reused by every generate call: a compiled step keeps the
    buffers' addresses (a new cache would record a new CUDA graph). Stale slots are always masked."""
    return M.KVCache(cfg, batch_size, slots, device, dtype, static=True)


@torch.no_grad()
def generate(model: M.VLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values=None,
             image_grid_thw=None, *, pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_ids: Sequence[int] = (), seed: int | None = None, on_token: Callable[[int, int], None] | None = None,
             compile: bool = False) -> list[list[int]]:
    """Each row's new tokens, cut *before* its first stop id (the stop id itself is not returned).

    input_ids (B, T) are left-padded (attention_mask 0 on the pads), so every row's last column is real and the
    next tokens of all rows land in the same column. on_token(row, token) is called as each returned token is
    produced (for streaming). A row that has stopped is still fed (its tokens are ignored) until all rows stop or
    max_new_tokens; max_new_tokens is cut to what fits in the model's context. compile: the decode step through
    torch.compile over a static cache (CUDA graphs on CUDA); else eager over the slots written so far (CPU).
    """
    device = next(model.parameters()).device
    B, T = input_ids.shape
    context = model.cfg.text.max_position_embeddings
    if T >= context:
        raise ValueError(f"the prompt is {T} tokens (text, images, videos), the model's context is {context} "
                         f"(max_position_embeddings): shorten it, or use fewer or smaller images and videos")
    max_new_tokens = min(max_new_tokens, context - T)
    if attention_mask is not None and not attention_mask[:, -1].all():
        raise ValueError("generate() needs left padding: the last column of attention_mask must be all ones")
    padded = attention_mask is not None and not attention_mask.all()  # no pads: no mask at all, the fast path
    input_ids = input_ids.to(device)
    vision = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                  video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts)
    vision = {k: v.to(device) for k, v in vision.items() if v is not None}

    dtype = model.model.norm.weight.dtype
    if compile:  # its size the next power of two from 1024 (up to the context): other lengths reuse one step
        slots = min(context, max(1024, 1 << (T + max_new_tokens - 1).bit_length()))
        cache = static_cache(model.cfg.text, B, slots, device, dtype)
        cache.length, cache.rope_delta = 0, None
    else:
        cache = M.KVCache(model.cfg.text, B, T + max_new_tokens, device=device, dtype=dtype)
    mask = None
    if padded or compile:  # one preallocated mask: pads 0, the prompt and every future token 1
        mask = torch.ones(B, cache.max_len, dtype=torch.long, device=device)
        mask[:, :T] = attention_mask if attention_mask is not None else 1
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None

    # prefill: the whole prompt, images and videos in one pass (segment attention); logits only for the last column
    h = model(input_ids, attention_mask=None if mask is None else mask[:, :T], cache=cache, return_hidden=True,
              **vision)
    logits = model.lm_head(h[:, -1]).float()
    if compile:  # the next token's position: the real tokens so far (+ the VLM's rope delta); its slot: T
        step = compiled_decode_step(device.type == "cuda")
        positions = mask[:, :T].sum(-1, keepdim=True) + (cache.rope_delta if cache.rope_delta is not None else 0)
        slot = torch.tensor([T], device=device)
    # the host reads the tokens every step only to stream them (or on CPU, where it costs nothing); else every 16
    check = 1 if on_token is not None or device.type != "cuda" else 16
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    new = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    done, streamed = torch.zeros(B, dtype=torch.bool, device=device), [False] * B
    for i in range(max_new_tokens):
        tokens = pick(logits, temperature, top_k, top_p, generator)  # (B,)
        new[:, i] = tokens
        done |= torch.isin(tokens, stop)
        if on_token is not None:
            for row, t in enumerate(tokens.tolist()):
                streamed[row] = streamed[row] or t in stop_ids
                if not streamed[row]:
                    on_token(row, t)
        if i == max_new_tokens - 1 or ((i + 1) % check == 0 and bool(done.all())):
            break
        if compile:
            logits = step(model, tokens[:, None], cache, mask, positions, slot)
            positions, slot, cache.length = positions + 1, slot + 1, cache.length + 1
        else:
            logits = decode_step(model, tokens[:, None], cache, None if mask is None else mask[:, : cache.length + 1])
    rows = new[:, : i + 1].tolist()
    return [row[: next((j for j, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]  # to the stop


# ----------------------------------------------------------------------------------------------------------------
# the command line


def answer(model, tokenizer, cfgs, messages, media, cfg: SampleConfig, stop_ids) -> str:
    """Stream the reply to `messages` (their images and videos: media; cfgs: the model's (image_cfg, video_cfg))
    and return its text. Text that ends in an incomplete character (U+FFFD: byte-level BPE splits some over
    tokens) waits for the next token."""
    images, videos = ([m for m in media if isinstance(m, pixels.Video) == v] for v in (False, True))
    ids, vision = build_prompt(tokenizer, messages, images, cfgs[0], videos, cfgs[1])
    new, shown = [], 0

    def show(row: int, token: int | None):  # token None: the end, whatever is left
        nonlocal shown
        new.extend([] if token is None else [token])
        text = tokenizer.decode(new)
        if token is None or not text.endswith("\ufffd"):
            print(text[shown:], end="", flush=True)
            shown = len(text)

    generate(model, torch.tensor([ids]), None, **vision, max_new_tokens=cfg.max_new_tokens,
             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop_ids=stop_ids, seed=cfg.seed,
             on_token=show, compile=cfg.compile and next(model.parameters()).is_cuda)
    show(0, None)
    print(flush=True)
    return tokenizer.decode(new)


def user_message(text: str, media: list) -> dict:
    """A user message: its images first, then its videos, then the text, as Qwen's examples put them."""
    kinds = sorted("video" if isinstance(m, pixels.Video) else "image" for m in media)
    return {"role": "user", "content": [{"type": k} for k in kinds] + [{"type": "text", "text": text}]}


def attach(kind: str, path: str, image_cfg, video_cfg):
    """An image, or a video (a file or a folder of frames), decoded; raises, naming the file, if it is missing or
    not one (or no path), or if the model takes no such input."""
    if (image_cfg if kind == "image" else video_cfg) is None:
        raise ValueError(f"this model cannot take {kind}s: " + ("a text-only LLM" if image_cfg is None else
                                                                  "its config.json has no video_token_id"))
    return pixels.load_image(path) if kind == "image" else pixels.load_video(path, video_cfg)


HELP = "`/image PATH`, `/video PATH` attach to your next message, `/reset` starts over, `/quit` or Ctrl-D leaves"


def chat(model, tokenizer, cfgs, cfg: SampleConfig, opening: list[dict], stop_ids, pending: list):
    """A multi-turn chat. Each turn prefills the whole conversation again, its images and videos included: simple,
    and the prompt is short next to the time spent decoding on a CPU. A command is checked when typed (an image or
    video is decoded then); an error loses nothing else; Ctrl-C stops an answer, at the prompt it leaves."""
    print(f"chat: type a message; {HELP}.", file=sys.stderr)
    messages, media = list(opening), []
    while True:
        kinds = [k for k in ("image", "video") for m in pending if isinstance(m, pixels.Video) == (k == "video")]
        attached = ", ".join(f"{kinds.count(k)} {k}{'s' * (kinds.count(k) > 1)}" for k in sorted(set(kinds)))
        try:
            line = input(f"you (+{attached})> " if attached else "you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        command, _, arg = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        try:  # an error says so and loses nothing: a turn that fails keeps its message's attachments pending
            if command == "/reset":
                messages, media, pending = list(opening), [], []
                print("(conversation and attachments cleared)", file=sys.stderr)
            elif command in ("/image", "/video"):
                pending.append(attach(command[1:], arg.strip(), *cfgs))
            elif command.startswith("/"):
                raise ValueError(f"unknown command {command}: {HELP}")
            elif line:
                message = user_message(line, pending)
                print("assistant> ", end="", flush=True)
                reply = answer(model, tokenizer, cfgs, messages + [message], media + pending, cfg, stop_ids)
                # Qwen3's template keeps no reasoning of past turns: only the text after </think> stays
                messages += [message, {"role": "assistant", "content": reply.split("</think>")[-1].lstrip("\n")}]
                media, pending = media + pending, []
        except (FileNotFoundError, ValueError) as e:  # a bad file, a model that takes none, too long a chat
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)


DEMO_MODEL = "out/demo/stage2"


def main(argv=None):
    cfg = parse_args(argv)
    if not cfg.model:
        if not (Path(DEMO_MODEL) / "config.json").is_file():
            sys.exit(f"error: no --model given and the demo's {DEMO_MODEL} does not exist yet: `python demo.py` makes "
                     "it (offline, minutes on a CPU), or pass --model DIR")
        cfg = dataclasses.replace(cfg, model=DEMO_MODEL)
    paths = [("image", p) for p in cfg.image] + [("video", p) for p in cfg.video]
    try:
        if missing := [f"{kind} file not found: {p}" for kind, p in paths if not Path(p).exists()]:
            raise FileNotFoundError(missing[0])  # before the (slow) model load; decoding needs the model's settings
        prompt = cfg.prompt
        if not prompt and not cfg.chat and not sys.stdin.isatty():  # piped in: that is the prompt, one answer
            if not (prompt := sys.stdin.read().strip()):
                raise ValueError("no --prompt and nothing on stdin: give a prompt, or --chat")
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, image_cfg = weights.load(cfg.model, device, getattr(torch, cfg.dtype), cfg.adapter,
                                                   cfg.max_pixels)
        cfgs = image_cfg, weights.video_config(cfg.model, model.cfg, cfg.fps, cfg.max_frames, cfg.video_max_pixels)
        media = [attach(kind, p, *cfgs) for kind, p in paths]
        system = cfg.system or weights.template_defaults(weights.read_chat_template(cfg.model))[0]
        stop_ids = weights.stop_token_ids(cfg.model)
        if not stop_ids:
            print(f"warning: {cfg.model} names no eos_token_id: answers run to --max-new-tokens", file=sys.stderr)
        opening = [{"role": "system", "content": system}] if system else []
        if not prompt:
            return chat(model, tokenizer, cfgs, cfg, opening, stop_ids, media)
        answer(model, tokenizer, cfgs, opening + [user_message(prompt, media)], media, cfg, stop_ids)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
