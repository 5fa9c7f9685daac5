"""Sampling from a model dir: one prefill pass over text + images, then one token at a time from a preallocated
KV cache. Streams to the terminal, or is called as a library (eval.py batches prompts through `generate`).

    python sample.py --model DIR --image x.jpg [--image y.jpg ...] --prompt "Describe the image."
    python sample.py --model DIR             # no --prompt: a multi-turn chat; `/image PATH` attaches an image

The library, for eval.py and notebooks (the model dir itself is weights.py's: weights.load, stop_token_ids):
    generate(model, input_ids (B, T) left-padded, attention_mask (B, T) | None = None, pixel_values=None,
             image_grid_thw=None, *, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, stop_ids=(),
             seed=None, on_token=None, compile=False) -> list[list[int]]      # each row's new tokens, no stop id
    build_prompt(tokenizer, messages, images=(), image_cfg=None)
        -> (ids: list[int], pixel_values (N, C*T*p*p) | None, image_grid_thw (n_images, 3) | None)
        messages: [{"role": "system" | "user" | "assistant",
                    "content": str | [{"type": "image"}, {"type": "text", "text": ...}, ...]}, ...]
        images: PIL images, one per {"type": "image"} item, in order; image_cfg: weights.load()'s
    pad_left(rows: list[list[int]], pad_id) -> (input_ids (B, T), attention_mask (B, T))

Numerics: with --dtype float32 the greedy tokens are transformers' generate(do_sample=False) tokens (tests/
test_sample.py). bfloat16, the default and the checkpoints' own dtype, halves the weight bytes read per decoded
token, which is what sets batch-1 decoding speed; on CPU weights.load also packs the decoder's bf16 weights in
oneDNN's layout (PackedLinear: the same numbers). The KV cache is in the model's dtype. Logits are sampled in
fp32. bench/sample_speed.py measures it against transformers.
"""
from __future__ import annotations

import dataclasses
import functools
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
    prompt: str = ""  # "" = a chat in a terminal, else the prompt is read from stdin
    chat: bool = False  # a chat even when stdin is not a terminal (turns and /commands a line each)
    system: str = ""  # "" = the chat template's default (Qwen2.5-VL: "You are a helpful assistant."; Qwen3: none)
    max_new_tokens: int = 512  # the answer stops here at the latest
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens up to this mass
    top_k: int = 0  # 0 = no top-k cut
    seed: int = 0  # of the sampling (temperature > 0)
    max_pixels: int = 0  # 0 = the model dir's preprocessor setting; lower it to spend fewer tokens per image
    adapter: str = ""  # a PEFT LoRA adapter dir (train.py --lora-rank's --out, or PEFT's), merged when loaded
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # float32: exactly transformers' greedy tokens
    device: str = ""  # "" = cuda if available, else cpu
    compile: bool = True  # torch.compile the decode step (CUDA only; on CPU the step is bound by weight reads)

    def __post_init__(self):
        cli.at_least(self, 1, "max_new_tokens")
        cli.at_least(self, 0, "temperature", "top_k", "max_pixels")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be within (0, 1]")


def parse_args(argv=None) -> SampleConfig:
    return cli.parse(SampleConfig, argv, __doc__)


# ----------------------------------------------------------------------------------------------------------------
# prompts: Qwen's ChatML, each image a <|vision_start|> <|image_pad|> x N <|vision_end|> block


def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """ChatML text of a conversation as Qwen's chat templates write it, with one <|image_pad|> per image item
    (a default system prompt is the caller's: see weights.template_defaults)."""
    text = ""
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):  # a list of items: images become one placeholder each
            content = "".join("<|vision_start|><|image_pad|><|vision_end|>" if item.get("type") == "image"
                              else item.get("text", "") for item in content)
        text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def build_prompt(tokenizer: Tokenizer, messages: list[dict], images: Sequence = (), image_cfg=None):
    """Token ids of the conversation ready for the assistant's answer, and the images' pixel values.

    As transformers' processor does, each <|image_pad|> is expanded to the image's token count (grid t*h*w /
    merge^2) before tokenising, so the ids are the ones a transformers pipeline would feed the model."""
    text = render(messages)
    n_slots = text.count("<|image_pad|>")
    if n_slots != len(images):
        raise ValueError(f"the messages have {n_slots} image items but {len(images)} images were given")
    pixel_values = grid = None
    if images:
        if image_cfg is None:
            raise ValueError("this model has no vision tower (a text-only LLM): it cannot take images")
        pixel_values, grid = pixels.preprocess_images(list(images), image_cfg)
        parts = text.split("<|image_pad|>")
        counts = pixels.num_image_tokens(grid, image_cfg.merge_size)
        text = parts[0] + "".join("<|image_pad|>" * n + part for n, part in zip(counts, parts[1:]))
    return tokenizer.encode(text, add_special_tokens=False).ids, pixel_values, grid


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (input_ids, attention_mask) (B, T), padded on the left so that every
    row's next token is generated at the same column."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :], mask[i, T - len(r) :] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


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


def cache_slots(tokens: int, context: int) -> int:
    """The static cache's size: the next power of two from 1024 (capped at the context), so prompts of other
    lengths reuse one compiled step."""
    return min(context, max(1024, 1 << (tokens - 1).bit_length()))


@functools.cache
def static_cache(cfg: M.TextConfig, batch_size: int, slots: int, device: torch.device, dtype: torch.dtype):
    """One static KV cache per shape for the process, reused by every generate call: a compiled step keeps the
    buffers' addresses (a new cache would record a new CUDA graph). Stale slots are always masked."""
    return M.KVCache(cfg, batch_size, slots, device, dtype, static=True)


@torch.no_grad()
def generate(model: M.VLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values=None,
             image_grid_thw=None, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, stop_ids: Sequence[int] = (), seed: int | None = None,
             on_token: Callable[[int, int], None] | None = None, compile: bool = False) -> list[list[int]]:
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
        raise ValueError(f"the prompt is {T} tokens (text + image tokens), the model's context is {context} "
                         f"(max_position_embeddings): shorten the prompt, use fewer images or lower --max-pixels")
    max_new_tokens = min(max_new_tokens, context - T)
    if attention_mask is not None and not attention_mask[:, -1].all():
        raise ValueError("generate() needs left padding: the last column of attention_mask must be all ones")
    padded = attention_mask is not None and not attention_mask.all()  # no pads: no mask at all, the fast path
    input_ids = input_ids.to(device)
    if pixel_values is not None:
        pixel_values, image_grid_thw = pixel_values.to(device), image_grid_thw.to(device)

    dtype = model.model.norm.weight.dtype
    if compile:
        cache = static_cache(model.cfg.text, B, cache_slots(T + max_new_tokens, context), device, dtype)
        cache.length, cache.rope_delta = 0, None
    else:
        cache = M.KVCache(model.cfg.text, B, T + max_new_tokens, device=device, dtype=dtype)
    mask = None
    if padded or compile:  # one preallocated mask: pads 0, the prompt and every future token 1
        mask = torch.ones(B, cache.max_len, dtype=torch.long, device=device)
        if attention_mask is not None:
            mask[:, :T] = attention_mask
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None

    # prefill: the whole prompt and the images in one pass (segment attention); logits only for the last column
    h = model(input_ids, pixel_values, image_grid_thw, attention_mask=None if mask is None else mask[:, :T],
              cache=cache, return_hidden=True)
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
    out = []
    for row in new[:, : i + 1].tolist():  # each row up to its first stop id
        cut = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
        out.append(row[:cut])
    return out


# ----------------------------------------------------------------------------------------------------------------
# the command line


class Streamer:
    """Prints a row's tokens as text as they come. Byte-level BPE can split a character over tokens: text that
    ends in an incomplete character (U+FFFD) waits for the next token."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def __call__(self, row: int, token: int):
        self.ids.append(token)
        if not self.tokenizer.decode(self.ids).endswith("\ufffd"):
            self.flush()

    def flush(self):
        text = self.tokenizer.decode(self.ids)
        print(text[self.shown :], end="", flush=True)
        self.shown = len(text)


def answer(model, tokenizer, image_cfg, messages, images, cfg: SampleConfig, stop_ids) -> str:
    """Stream the assistant's reply to `messages` and return its text."""
    ids, pixel_values, grid = build_prompt(tokenizer, messages, images, image_cfg)
    streamer = Streamer(tokenizer)
    generate(model, torch.tensor([ids]), None, pixel_values, grid, max_new_tokens=cfg.max_new_tokens,
             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop_ids=stop_ids, seed=cfg.seed,
             on_token=streamer, compile=cfg.compile and next(model.parameters()).is_cuda)
    streamer.flush()  # an answer cut off inside a character ends in U+FFFD
    print(flush=True)
    return tokenizer.decode(streamer.ids)


def user_message(text: str, n_images: int) -> dict:
    """A user message with its images first, as Qwen's examples put them."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def user_turn(text: str, paths: list) -> tuple[dict, list]:
    """The user message and its decoded images (raises, naming the file, if one is missing or not an image)."""
    return user_message(text, len(paths)), [pixels.load_image(p) for p in paths]


HELP = "`/image PATH` attaches an image to your next message, `/reset` starts over, `/quit` or Ctrl-D leaves"


def chat(model, tokenizer, image_cfg, cfg: SampleConfig, opening: list[dict], stop_ids, pending: list):
    """A multi-turn chat. Each turn prefills the whole conversation again, its images included: simple, and the
    prompt is short next to the time spent decoding on a CPU. A command is checked when typed (an image is
    decoded then); an error loses nothing else; Ctrl-C stops an answer, at the prompt it leaves."""
    print(f"chat: type a message; {HELP}.", file=sys.stderr)
    messages, images = list(opening), []
    while True:
        attached = f" (+{len(pending)} image{'s' if len(pending) > 1 else ''})" if pending else ""
        try:
            line = input(f"you{attached}> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        command, _, arg = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            messages, images, pending = list(opening), [], []
            print("(conversation and attached images cleared)", file=sys.stderr)
        elif command == "/image":
            try:
                if image_cfg is None:
                    raise ValueError("this model is a text-only LLM: it cannot take images")
                pending.append(pixels.load_image(arg.strip()))  # raises, naming the file, if missing or not one
            except (FileNotFoundError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
        elif command.startswith("/"):
            print(f"error: unknown command {command}: {HELP}", file=sys.stderr)
        elif line:
            message = user_message(line, len(pending))
            try:
                print("assistant> ", end="", flush=True)
                reply = answer(model, tokenizer, image_cfg, messages + [message], images + pending, cfg, stop_ids)
            except ValueError as e:  # too long a chat: say so; the message and its images stay pending
                print(f"error: {e}", file=sys.stderr)
            except KeyboardInterrupt:
                print("\n(answer interrupted)", file=sys.stderr)
            else:
                # Qwen3's template keeps no reasoning of past turns: only the text after </think> stays
                reply = reply.split("</think>")[-1].lstrip("\n")
                messages += [message, {"role": "assistant", "content": reply}]
                images, pending = images + pending, []


DEMO_MODEL = "out/demo/stage2"


def main(argv=None):
    cfg = parse_args(argv)
    if not cfg.model:
        if not (Path(DEMO_MODEL) / "config.json").is_file():
            sys.exit(f"error: no --model given and the demo's {DEMO_MODEL} does not exist yet: `python demo.py` makes "
                     "it (offline, minutes on a CPU), or pass --model DIR")
        cfg = dataclasses.replace(cfg, model=DEMO_MODEL)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        message, images = user_turn(cfg.prompt, cfg.image)  # before the (slow) model load: a bad path fails at once
        prompt = cfg.prompt
        if not prompt and not cfg.chat and not sys.stdin.isatty():  # piped in: that is the prompt, one answer
            if not (prompt := sys.stdin.read().strip()):
                raise ValueError("no --prompt and nothing on stdin: give a prompt, or --chat")
            message = user_message(prompt, len(images))
        model, tokenizer, image_cfg = weights.load(cfg.model, device, getattr(torch, cfg.dtype), cfg.adapter,
                                                   cfg.max_pixels)
        if cfg.image and image_cfg is None:
            raise ValueError(f"{cfg.model} is a text-only LLM (no vision tower): it cannot take --image")
        system = cfg.system or weights.template_defaults(weights.read_chat_template(cfg.model))[0]
        stop_ids = weights.stop_token_ids(cfg.model)
        if not stop_ids:
            print(f"warning: {cfg.model} names no eos_token_id: every answer runs to --max-new-tokens",
                  file=sys.stderr)
        opening = [{"role": "system", "content": system}] if system else []
        if not prompt:
            return chat(model, tokenizer, image_cfg, cfg, opening, stop_ids, images)
        answer(model, tokenizer, image_cfg, opening + [message], images, cfg, stop_ids)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
