"""Decode tokens/s and time to first token: sample.generate vs transformers' generate, on the same weights, in one
process, batch 1, greedy. The model is Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads of 128, tied
151936-token vocabulary) with random bf16 weights, written once to --dir.

    python bench/sample_speed.py [--dir /tmp/qwen3_0.6b_shape] [--prompt 512 2048] [--new 64] [--threads N]

Both lengths are realistic for a VLM: one 640x480 image is ~300 tokens to Qwen3-VL, a 1920x1080 one ~2000.
Timestamps come from the token callbacks (our on_token, transformers' streamer): TTFT = start to the first new
token (prefill included), decode tokens/s = tokens after the first / the time they took. Each number is the best
of --repeats runs, ours and transformers' interleaved, so a busy machine slows both alike.

Measured on the project's 2-core AMD EPYC (avx512_bf16), quiet machine, 64 new tokens, best of 3:
    2 threads: prompt 512: 29.95 vs 9.99 tokens/s = 3.00x; prompt 2048: 18.84 vs 6.19 = 3.04x; TTFT 1.04-1.05x
    1 thread:  prompt 512: 19.47 vs 7.05 tokens/s = 2.76x; prompt 2048: 12.40 vs 3.50 = 3.55x; TTFT 1.03-1.07x
    --dtype float32, 2 threads, prompt 512: 7.81 vs 7.44 = 1.05x, all 64 greedy tokens identical
Batch-1 decoding reads every weight once per token (1.19 GB in bf16 here). Two things make ours faster: weights.load
packs the decoder's bf16 weights in oneDNN's blocked layout (PackedLinear: a decode step's matmuls go from ~63 ms to
~21 ms, bit-identical logits), and a decode step's attention puts each kv head's query heads in the query rows (the
same products per head) instead of SDPA's enable_gqa, which copies keys and values per query head and is ~10x slower
in bf16 on CPU (transformers pays that). In bf16, random weights give near-flat logits, so the two implementations'
different summation orders flip a near-tie after a few tokens; in fp32 all tokens agree.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
import sample  # noqa: E402
import weights  # noqa: E402
from machine import cpu_model  # noqa: E402

QWEN3_06B = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024, intermediate_size=3072,
                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
                 tie_word_embeddings=True, torch_dtype="bfloat16", hidden_act="silu", bos_token_id=151643,
                 eos_token_id=151645)


def make_checkpoint(out: Path):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        m = M.VLM(M.config_from_hf(QWEN3_06B))
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in m.state_dict().items()
             if k != "lm_head.weight"}  # tied: the file holds the embeddings once, as Qwen3-0.6B's does
    for k in state:
        if k.endswith("norm.weight"):
            state[k] = torch.ones_like(state[k])
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(QWEN3_06B, indent=2))


class Stamps:
    """When each new token came out: our on_token callback and transformers' streamer protocol."""

    def __init__(self):
        self.times = []

    def __call__(self, row, token):  # sample.generate's on_token
        self.times.append(time.perf_counter())

    def put(self, value):  # transformers calls put(prompt ids) first, then put(token) per step
        self.times.append(time.perf_counter())

    def end(self):
        pass


def timed(run, skip_first: bool) -> tuple[float, float]:
    """(TTFT in s, decode tokens/s) of one generate call."""
    stamps, start = Stamps(), time.perf_counter()
    run(stamps)
    times = stamps.times[1:] if skip_first else stamps.times
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/qwen3_0.6b_shape")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prompt", type=int, nargs="+", default=[512, 2048], help="prompt lengths in tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per generate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    d, dtype = Path(args.dir), getattr(torch, args.dtype)
    if not (d / "model.safetensors").is_file():
        make_checkpoint(d)
    ours = weights.from_pretrained(d, dtype=dtype)
    packed = weights.pack_for_cpu(ours)  # as weights.load does
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    cfg = ours.cfg.text
    print(f"model: Qwen3-0.6B shape ({cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
          f"{cfg.num_kv_heads} x {cfg.head_dim}, vocab {cfg.vocab_size}, tied), random {args.dtype} weights")
    print(f"run: CPU {cpu_model()}, transformers "
          f"{transformers.__version__}; batch 1, greedy, {args.new} new tokens, best of {args.repeats} "
          f"(ours and transformers interleaved); ours: {packed} Linears packed for oneDNN")
    for n_prompt in args.prompt:
        ids = torch.randint(0, 151643, (1, n_prompt), generator=torch.Generator().manual_seed(n_prompt))
        runs = {
            "ours": (lambda on: sample.generate(ours, ids, max_new_tokens=args.new, on_token=on)[0], False),
            "transformers": (lambda on: hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                do_sample=False, eos_token_id=None, pad_token_id=0, streamer=on)[0, n_prompt:].tolist(), True),
        }
        with torch.no_grad():
            a, b = runs["ours"][0](None), runs["transformers"][0](None)  # also the warm-up
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            best = {name: (float("inf"), 0.0) for name in runs}
            for _ in range(args.repeats):
                for name, (run, skip_first) in runs.items():
                    ttft, tps = timed(run, skip_first)
                    best[name] = (min(best[name][0], ttft), max(best[name][1], tps))
        # random weights give near-flat logits: in bf16 a rounding difference can flip a near-tie (fp32: all agree)
        print(f"prompt {n_prompt} tokens (the first {same} of {args.new} greedy tokens identical)")
        for name, (ttft, tps) in best.items():
            print(f"  {name:>12}: TTFT {ttft * 1e3:8.1f} ms   decode {tps:6.2f} tokens/s")
        (o_ttft, o_tps), (h_ttft, h_tps) = best["ours"], best["transformers"]
        print(f"  ours / transformers: decode {o_tps / h_tps:.2f}x tokens/s, TTFT {h_ttft / o_ttft:.2f}x faster")


if __name__ == "__main__":
    main()
