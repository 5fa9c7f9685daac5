"""Every GPU number of the project in one run (< 8 minutes on one H100 / H200), random weights built on the fly:

    python bench/gpu_check.py                      # all parts; JSON to --out ($OUT/gpu_check.json, else ./)
    python bench/gpu_check.py --parts attention,decode
    python bench/gpu_check.py --tiny               # the same code on CPU, tiny shapes, < 1 min (its test)

  attention  attention.segment_attention with the kernel attention.kernel_for picks (flash-attn or PyTorch's varlen
             on CUDA, SDPA per segment on CPU), bf16, against a dense block-diagonal causal reference in fp32: max
             |diff| of the output and of the q, k, v gradients; GQA 32:8 heads of 128, 6 documents in 8192 tokens
  fsdp       the loss of one packed batch from a plain bf16 model (weights.from_pretrained) and from
             train.load_model's FSDP2 model on a one-rank mesh (fp32 master weights, bf16 compute): expected equal
  train      a stage-2 step (forward, backward, clip, AdamW) of a Qwen3-VL-2B vision tower + Qwen3-1.7B decoder
             on one packed 8192-token row with 4 images, per activation-checkpointing mode: tokens/s, MFU
             (flops.step_flops / flops.peak_flops), peak memory
  decode     sample.generate(compile=True) at batch 1 on Qwen3-0.6B / 1.7B / 8B shapes with 512- and 8192-token
             prompts: tokens/s against the HBM limit (bytes read per token / bandwidth measured here by a device
             copy), time to first token, compile time; eval throughput, 8 left-padded prompts vs 1 (samples/s)
  video      a prompt with a 16-frame video (Qwen3-VL's layout: a block per frame pair) through the Qwen3-VL-2B
             tower + 1.7B decoder: bf16 logits against the same weights in fp32 (max |diff|), prefill tokens/s
Each part has a time budget; what does not fit is skipped and says so. One `name: value unit` line per number.
"""
import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import attention as A  # noqa: E402
import flops  # noqa: E402
import model as M  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import weights  # noqa: E402

IMAGE, START, END, VIDEO = 151655, 151652, 151653, 151656
# Qwen3 decoders (config.json values, /work/shared/ARCHITECTURE.md): hidden, MLP, layers, heads, kv heads, tied
QWEN3 = {"0.6B": (1024, 3072, 28, 16, 8, True), "1.7B": (2048, 6144, 28, 16, 8, True),
         "8B": (4096, 12288, 36, 32, 8, False), "tiny": (64, 128, 2, 4, 2, True)}
# Qwen3-VL-2B's vision tower (its text model is Qwen3-1.7B's shape); tiny: the same layout, small
VISION = {"2B": dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, patch_size=16,
                     num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
          "tiny": dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=4,
                       num_position_embeddings=16, deepstack_visual_indexes=[0])}
BUDGET_S = {"setup": 60, "attention": 30, "fsdp": 60, "train": 170, "decode": 180, "video": 40}  # 540 s, of 9 min
STAGE2 = dict(vision=True, merger=True, llm=True)


def qwen3_config(shape: str) -> dict:
    hidden, mlp, layers, heads, kv, tied = QWEN3[shape]
    tiny = shape == "tiny"
    return dict(model_type="qwen3", hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=16 if tiny else 128,
                vocab_size=512 if tiny else 151936, rope_theta=1e6, rms_norm_eps=1e-6,
                max_position_embeddings=4096 if tiny else 40960, tie_word_embeddings=tied, hidden_act="silu")


def vlm_config(tiny: bool) -> dict:
    """Qwen3-VL's config.json layout: the 2B's vision tower and 3-D RoPE on a Qwen3-1.7B-shaped decoder."""
    text = qwen3_config("tiny" if tiny else "1.7B")
    vision = dict(VISION["tiny" if tiny else "2B"], out_hidden_size=text["hidden_size"], temporal_patch_size=2,
                  spatial_merge_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh")
    rope = dict(rope_type="default", mrope_section=[4, 2, 2] if tiny else [24, 20, 20], mrope_interleaved=True)
    ids = dict(image_token_id=500, vision_start_token_id=501, vision_end_token_id=502, video_token_id=503) if tiny \
        else dict(image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END, video_token_id=VIDEO)
    return dict(model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"], **ids,
                tie_word_embeddings=text["tie_word_embeddings"], text_config=dict(text, rope_scaling=rope),
                vision_config=vision)


def random_state(cfg: M.ModelConfig, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 weights ~ N(0, 0.02), norms 1, biases 0, made on `device` (fast for billions of parameters)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M.VLM(cfg).state_dict().items()}
    g = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if "norm" in name or name.endswith("ln_q.weight"):
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g, device=device) * 0.02
        state[name] = t.to(device=device, dtype=torch.bfloat16)
    if cfg.text.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def random_model(cfg: M.ModelConfig, device) -> M.VLM:
    with torch.device("meta"):
        model = M.VLM(cfg)
    model.load_state_dict(random_state(cfg, device), strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the parameters: tie again (as weights.from_pretrained does)
    return model.eval()


def packed_batch(cfg: M.ModelConfig, T: int, n_docs: int, side: int) -> dict:
    """One row of n_docs packed documents as data.collate makes it, each: text, an image of side x side patches
    between its vision tokens, text; the last half of each document is its answer (labels)."""
    v, g = cfg.vision, torch.Generator().manual_seed(0)
    n_image = side * side // v.spatial_merge_size**2
    grid = torch.tensor([[1, side, side]])
    ids, pos, docs = [], [], []
    for d in range(n_docs):
        L = T // n_docs if d < n_docs - 1 else T - (n_docs - 1) * (T // n_docs)
        x = torch.randint(0, min(cfg.image_token_id, cfg.vision_start_token_id), (L,), generator=g)  # plain text
        x[8], x[9 + n_image] = cfg.vision_start_token_id, cfg.vision_end_token_id
        x[9 : 9 + n_image] = cfg.image_token_id
        ids.append(x)
        pos.append(M.rope_index(x[None], grid, cfg.image_token_id, v.spatial_merge_size)[0][:, 0])  # (3, L), from 0
        docs.append(torch.full((L,), d + 1))
    ids, doc_ids = torch.cat(ids)[None], torch.cat(docs)[None]
    labels = ids.clone()
    for d in range(1, n_docs + 1):  # each document's first half is its prompt
        at = (doc_ids[0] == d).nonzero().squeeze(1)
        labels[0, at[: len(at) // 2]] = -100
    row = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids), doc_ids=doc_ids,
                position_ids=torch.cat(pos, dim=1)[:, None], image_grid_thw=grid.repeat(n_docs, 1),
                pixel_values=torch.randn(n_docs * side * side, row, generator=g))


class Run:
    """The numbers so far, the clock and the budgets."""

    def __init__(self, args, device: torch.device):
        self.args, self.device, self.start = args, device, time.perf_counter()
        self.results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "tiny": args.tiny, "skipped": [], "errors": {}}
        self.part, self.part_start = "", self.start

    def report(self, name: str, value: float, unit: str = "") -> None:
        self.results[name] = value
        print(f"{name}: {value:.6g} {unit}".rstrip(), flush=True)

    def over(self, what: str) -> bool:
        """True (and the skip noted) when this part has used its budget or the whole run has used its own."""
        used, total = time.perf_counter() - self.part_start, time.perf_counter() - self.start
        if used <= BUDGET_S[self.part] and total <= self.args.budget_s:
            return False
        self.results["skipped"].append(what)
        print(f"skipped: {what} (part {self.part}: {used:.0f} s of {BUDGET_S[self.part]} s; run: {total:.0f} s of "
              f"{self.args.budget_s:.0f} s)", flush=True)
        return True

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------------------
# the parts


def check_attention(run: Run, _) -> None:
    dev, tiny = run.device, run.args.tiny
    lengths = [7, 5, 12, 8, 1, 31] if tiny else [3000, 2048, 1500, 1024, 400, 220]  # 64 / 8192 tokens
    nh, nkv, hd = (4, 2, 16) if tiny else (32, 8, 128)
    N, g = sum(lengths), torch.Generator(dev).manual_seed(0)
    q, k, v, grad = (torch.randn(N, h, hd, generator=g, device=dev).to(torch.bfloat16) for h in (nh, nkv, nkv, nh))
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))
    seg = A.make_segments(ids, A.kernel_for(q))
    print(f"attention kernel: {seg.kernel} ({N} tokens in {len(lengths)} segments, heads {nh}:{nkv} x {hd})")
    run.results["attn_kernel"] = seg.kernel
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = A.segment_attention(*ours, seg, causal=True)
    out.backward(grad)
    # the reference: fp32 copies, k and v repeated per query head (GQA), one dense (N, N) block-diagonal causal mask
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    i = torch.arange(N, device=dev)
    mask = (ids[:, None] == ids[None, :]) & (i[None, :] <= i[:, None])
    qf, kf, vf = ref[0], *(t.repeat_interleave(nh // nkv, dim=1) for t in ref[1:])
    y = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qf, kf, vf)), attn_mask=mask)
    y = y[0].transpose(0, 1)  # (1, nh, N, hd) -> (N, nh, hd)
    y.backward(grad.float())
    run.report("attn_out_max_diff", (out.float() - y).abs().max().item())
    for name, a, b in zip("qkv", ours, ref):
        run.report(f"attn_d{name}_max_diff", (a.grad.float() - b.grad).abs().max().item())
    run.report("attn_out_max_abs", y.abs().max().item())  # for scale: bf16 keeps 8 bits of it


def check_fsdp(run: Run, ctx: dict) -> None:
    dev, batch = run.device, ctx["batch"]
    inputs = {k: batch[k].to(dev) for k in train.MODEL_INPUTS if batch.get(k) is not None}
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    plain = weights.from_pretrained(ctx["dir"], device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        a = plain(**inputs, vision_always=True).item() / n_labels
    del plain
    free(dev)
    cfg = train.TrainConfig(model=str(ctx["dir"]), stage=2, dtype="bfloat16", activation_checkpointing="none",
                            compile=False)  # the numbers of FSDP2 itself, not of a compiler's fusions
    fsdp, _, _ = train.load_model(cfg, dev)
    with torch.no_grad():
        b = fsdp(**inputs, vision_always=True).item() / n_labels
    del fsdp
    free(dev)
    run.report("fsdp_loss_plain", a, "nats/token")
    run.report("fsdp_loss_fsdp2", b, "nats/token")
    run.report("fsdp_loss_diff", abs(a - b), "nats/token")


def check_train(run: Run, ctx: dict) -> None:
    dev, batch, args = run.device, ctx["batch"], run.args
    inputs = {k: batch[k].to(dev) for k in train.MODEL_INPUTS if batch.get(k) is not None}
    n_labels, n_tokens = int((batch["labels"][:, 1:] != -100).sum()), int(batch["attention_mask"].sum())
    step_flops = flops.step_flops(M.config_from_hf(ctx["hf_config"]), batch, STAGE2)
    peak = flops.peak_flops(run.results["device"], args.peak_tflops)
    run.report("train_tokens_per_step", n_tokens, "tokens")
    run.report("train_model_tflop_per_step", step_flops / 1e12, "TFLOP")
    for mode in ("none", "selective", "full"):
        if run.over(f"train ac={mode}"):
            continue
        cfg = train.TrainConfig(model=str(ctx["dir"]), stage=2, dtype="bfloat16", activation_checkpointing=mode)
        model, _, _ = train.load_model(cfg, dev)  # compiled per block on CUDA, as train.py runs it
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), foreach=True)
        free(dev)
        times = []
        for _ in range(args.warmup + args.steps):
            t = run.now()
            loss = model(**inputs, vision_always=True)
            (loss / n_labels).backward()
            train.clip_grad_norm(params, 1.0, dev)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(run.now() - t)
        dt = sum(times[args.warmup:]) / args.steps
        run.report(f"train_{mode}_first_step_s", times[0], "s")  # compile included
        run.report(f"train_{mode}_step_s", dt, "s")
        run.report(f"train_{mode}_tokens_per_s", n_tokens / dt, "tokens/s")
        run.report(f"train_{mode}_mfu", step_flops / dt / peak)
        run.report(f"train_{mode}_peak_mem_gb", train.peak_memory_gb(dev), "GiB")
        run.report(f"train_{mode}_loss", loss.item() / n_labels, "nats/token")
        del model, optimizer, params, loss
        free(dev)


def bandwidth(run: Run) -> float:
    """Device memory bandwidth in bytes/s: a large copy reads and writes every byte once."""
    n = (64 if run.args.tiny else 4096) * 2**20
    src = torch.ones(n, dtype=torch.uint8, device=run.device)
    dst = src.clone()
    t = run.now()
    for _ in range(10):
        dst.copy_(src)
    return 2 * n * 10 / (run.now() - t)


def check_decode(run: Run, _) -> None:
    dev, tiny = run.device, run.args.tiny
    shapes, prompts = (["tiny"], [16, 64]) if tiny else (["0.6B", "1.7B", "8B"], [512, 8192])
    new, eval_new = (8, 4) if tiny else (128, 64)
    if tiny and dev.type == "cpu":  # dynamo traces the same static-cache step (fullgraph), without inductor's
        # C++ build (20 s a graph on 2 cores; tests/test_sample.py covers it): one backend swapped, the path kept
        sample.compiled_decode_step = functools.cache(lambda cuda: torch.compile(
            sample.decode_step, backend="aot_eager", dynamic=False, fullgraph=True))
    bw = bandwidth(run)
    run.report("hbm_bandwidth_gb_s", bw / 1e9, "GB/s")
    g = torch.Generator().manual_seed(0)
    for shape in shapes:
        if run.over(f"decode {shape}"):
            continue
        model = random_model(M.config_from_hf(qwen3_config(shape)), dev)
        t = model.cfg.text
        # read per token: every weight but the embedding table (one row of it; a tied one is read as the lm_head)
        weights = 2 * (sum(p.numel() for p in model.parameters()) - (0 if t.tie_word_embeddings else
                                                                        t.vocab_size * t.hidden_size))
        for T in prompts:
            if run.over(f"decode {shape} prompt {T}"):
                continue
            # 8B at 8192: 16.4 GB of weights + a 16384-slot static KV cache of 2.4 GB, well inside an H100's 80
            ids = torch.randint(0, 150000 if not tiny else 500, (1, T), generator=g)
            t0 = run.now()
            sample.generate(model, ids, max_new_tokens=new, compile=True)  # compiles, captures the CUDA graphs
            first = run.now() - t0
            t0 = run.now()
            sample.generate(model, ids, max_new_tokens=1, compile=True)  # prefill + the first token
            ttft = run.now() - t0
            t0 = run.now()
            sample.generate(model, ids, max_new_tokens=new, compile=True)
            total = run.now() - t0
            tok_s = (new - 1) / (total - ttft)
            kv = 2 * t.num_layers * t.num_kv_heads * t.head_dim * 2 * (T + new // 2)  # K and V, bf16, mid-answer
            limit = bw / (weights + kv)
            name = f"decode_{shape}_{T}"
            run.report(f"{name}_tokens_per_s", tok_s, "tokens/s")
            run.report(f"{name}_limit_tokens_per_s", limit, "tokens/s")
            run.report(f"{name}_fraction_of_limit", tok_s / limit)
            run.report(f"{name}_ttft_ms", ttft * 1e3, "ms")
            run.report(f"{name}_compile_s", max(first - total, 0.0), "s")
        if shape == ("tiny" if tiny else "1.7B") and not run.over(f"eval throughput {shape}"):
            T = prompts[0]
            rows = [torch.randint(0, 500, (T - (T // 16) * i,), generator=g).tolist() for i in range(8)]
            for B in (1, 8):
                ids, mask = sample.pad_left(rows[:B], pad_id=0)
                sample.generate(model, ids, mask, max_new_tokens=eval_new, compile=True)  # compile for this batch
                t0 = run.now()
                sample.generate(model, ids, mask, max_new_tokens=eval_new, compile=True)
                run.report(f"eval_b{B}_samples_per_s", B / (run.now() - t0), "samples/s")
        del model
        sample.static_cache.cache_clear()  # the caches and CUDA graphs of this shape go with it
        torch._dynamo.reset()
        free(dev)


def check_video(run: Run, ctx: dict) -> None:
    dev, tiny = run.device, run.args.tiny
    cfg = M.config_from_hf(ctx["hf_config"])
    groups, side = (2, 4) if tiny else (8, 32)  # 16 frames of 512x512 pixels: 8192 patches, 2048 LLM tokens
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, cfg.image_token_id, (n,), generator=g)  # noqa: E731 (plain text tokens)
    pads = torch.full((side * side // cfg.vision.spatial_merge_size**2,), cfg.video_token_id)
    block = lambda: [text(5), torch.tensor([cfg.vision_start_token_id]), pads, torch.tensor([cfg.vision_end_token_id])]  # noqa: E731
    ids = torch.cat([text(16), *(x for _ in range(groups) for x in block()), text(32)])[None].to(dev)  # "<t s>" ~ 5
    v = cfg.vision
    video = dict(pixel_values_videos=torch.randn(groups * side * side, v.in_channels * v.temporal_patch_size
                                                 * v.patch_size**2, generator=g).to(dev),
                 video_grid_thw=torch.tensor([[groups, side, side]], device=dev))
    model = random_model(cfg, dev)
    with torch.no_grad():
        model(ids, **video)  # warm-up
        t = run.now()
        got = model(ids, **video)[0].float()
        dt = run.now() - t
        pv = video["pixel_values_videos"]  # rows are frame pair after frame pair: the pairs in reverse order
        back = model(ids, **dict(video, pixel_values_videos=pv.view(groups, -1, pv.shape[-1]).flip(0).flatten(0, 1)))
        del model
        free(dev)
        want = random_model(cfg, dev).float()(ids, **{k: x.float() if x.is_floating_point() else x
                                                      for k, x in video.items()})[0]
    run.report("video_prompt_tokens", ids.shape[1], "tokens")
    run.report("video_prefill_tokens_per_s", ids.shape[1] / dt, "tokens/s")
    run.report("video_logits_max_diff_bf16_fp32", (got - want).abs().max().item())
    run.report("video_logits_max_abs", want.abs().max().item())  # for scale
    run.report("video_logits_diff_frames_reversed", (back[0].float() - want).abs().max().item())  # must be larger
    free(dev)


PARTS = {"attention": check_attention, "fsdp": check_fsdp, "train": check_train, "decode": check_decode,
         "video": check_video}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of: " + ", ".join(PARTS))
    p.add_argument("--tiny", action="store_true", help="tiny shapes, on CPU unless CUDA is there: the script's CI")
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole run's; each part also has its own")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak for MFU; 0 = from its name")
    p.add_argument("--warmup", type=int, default=None, help="untimed train steps; default 2 (--tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps; default 3 (--tiny: 2)")
    p.add_argument("--dir", default="", help="where the random checkpoint goes; '' = a temporary directory")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else 1 if args.tiny else 2
    args.steps = args.steps if args.steps is not None else 2 if args.tiny else 3
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        p.error(f"--parts {args.parts}: choose from {', '.join(PARTS)}")
    # a decode step per model shape, cache size and batch size is one more graph of the same compiled function
    torch._dynamo.config.recompile_limit = 64  # (8 by default: past it, dynamo falls back to eager silently)
    _, _, device = train.setup_distributed()  # a one-rank process group: train.load_model shards with FSDP2
    run = Run(args, device)
    print(f"device: {run.results['device']}, torch {torch.__version__}, parts {','.join(parts)}", flush=True)
    tmp = tempfile.TemporaryDirectory() if not args.dir else None
    try:
        run.part, run.part_start = "setup", time.perf_counter()
        ctx = {"dir": Path(args.dir or tmp.name), "hf_config": vlm_config(args.tiny)}
        if {"fsdp", "train"} & set(parts):  # the random VLM checkpoint both read (train.load_model wants a dir)
            cfg = M.config_from_hf(ctx["hf_config"])
            weights.save_state_dict(random_state(cfg, device), ctx["dir"], ctx["hf_config"])
            ctx["batch"] = packed_batch(cfg, 64 if args.tiny else 8192, 2 if args.tiny else 4, 4 if args.tiny else 32)
            run.report("part_setup_s", time.perf_counter() - run.part_start, "s")
        for part in parts:
            run.part, run.part_start = part, time.perf_counter()
            if run.over(part):
                continue
            try:
                PARTS[part](run, ctx)
            except Exception as e:  # one part's failure (an OOM, a missing kernel) must not cost the others' numbers
                traceback.print_exc()
                run.results["errors"][part] = f"{type(e).__name__}: {e}"[:2000]
                free(device)
            run.report(f"part_{part}_s", time.perf_counter() - run.part_start, "s")
    finally:
        run.results["total_s"] = time.perf_counter() - run.start
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(run.results, indent=1) + "\n")
        print(f"total: {run.results['total_s']:.1f} s; wrote {args.out}", flush=True)
        if tmp is not None:
            tmp.cleanup()
        gc.collect()  # FSDP's reference cycles hold the process group: collect them first (see train.main)
        dist.destroy_process_group()
    return run.results


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
