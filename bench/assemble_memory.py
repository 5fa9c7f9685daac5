"""Peak RAM of `convert.py assemble` on checkpoints of a realistic shape: a Qwen2.5-VL-like donor (8-block
1280-wide vision tower + a small LM, old Hub layout and config.json) and a Qwen3-like LLM (1024 wide, 6 layers,
the real 151936 vocabulary, untied), random bf16 tensors, sharded at 200 MB.

Each is measured in a fresh process as peak RSS (getrusage) minus the RSS after the imports; every tensor is
read and written in full, so the pages of the memory-mapped inputs are really touched.

    python bench/assemble_memory.py [--dir /tmp/assemble_bench]
"""
import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE = r"""
import sys, torch
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
import convert, model as M
from tiny_tokenizer import QWEN3, QWEN25_VL, make_tokenizer
ids = dict(image_token_id=403, video_token_id=406, vision_start_token_id=408, vision_end_token_id=401)  # tiny tokenizer
vision = dict(depth=8, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=1024, patch_size=14,
              temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[3, 7],
              hidden_act="silu", in_chans=3, tokens_per_second=2)
donor = dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", hidden_size=1024,
             intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
             tie_word_embeddings=True, rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24]),
             vision_config=vision, **ids)
llm = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, intermediate_size=3072,
           num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
           rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False)
g = torch.Generator().manual_seed(0)
for name, hf, template in (("donor", donor, QWEN25_VL), ("llm", llm, QWEN3)):
    with torch.device("meta"):
        m = M.VLM(M.config_from_hf(hf))
    state = {{k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in m.state_dict().items()
             if k != "lm_head.weight" or not hf["tie_word_embeddings"]}}
    weights.save_state_dict(state, {out!r} + "/" + name, hf, max_shard_size="200MB")
    make_tokenizer({out!r} + "/" + name, template)
"""

MEASURE = r"""
import resource, sys, time
sys.path.insert(0, {root!r})
import convert
import weights
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base, t0 = rss_mb(), time.time()
convert.assemble(convert.AssembleArgs(vision={donor!r}, llm={llm!r}, out={out!r}, merger_init={init!r}, force=True))
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.time() - t0)
"""


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def size_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in d.glob("*.safetensors")) / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/assemble_bench")
    d = Path(p.parse_args().dir)
    if not (d / "llm" / "config.json").is_file():
        run(MAKE.format(root=str(ROOT), out=str(d)))
    donor, llm = size_mb(d / "donor"), size_mb(d / "llm")
    print(f"inputs: donor {donor:.0f} MiB + llm {llm:.0f} MiB = {donor + llm:.0f} MiB (bf16, 200 MB shards); "
          f"largest tensor {151936 * 1024 * 2 / 2**20:.0f} MiB (embed_tokens / lm_head)")
    for init in ("fresh", "copy"):
        out = d / f"out_{init}"
        code = MEASURE.format(root=str(ROOT), donor=str(d / "donor"), llm=str(d / "llm"), out=str(out), init=init)
        base, peak, seconds = map(float, run(code).split("\n")[-2].split())
        print(f"assemble --merger-init {init}: output {size_mb(out):.0f} MiB in {seconds:.1f} s; peak RSS above "
              f"baseline {peak - base:.0f} MiB = {(peak - base) / (donor + llm):.2f}x the inputs (absolute {peak:.0f} MiB)")


if __name__ == "__main__":
    main()
