"""Peak RAM of loading a ~1 GB bf16 Qwen3 checkpoint: our from_pretrained vs transformers', each in a fresh
process, measured as peak RSS minus the RSS after `import torch` (and the library) alone, with every weight
read once after loading (safetensors maps the file: untouched pages are not resident).

    python bench/load_memory.py [--dir /tmp/qwen3_1gb]
"""
import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE = r"""
import json, sys, torch
from safetensors.torch import save_file
sys.path.insert(0, {root!r})
import model as M
hf = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024, intermediate_size=3072,
          num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
          rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False,
          torch_dtype="bfloat16", hidden_act="silu")
with torch.device("meta"):
    m = M.VLM(M.config_from_hf(hf))
g = torch.Generator().manual_seed(0)
state = {{k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in m.state_dict().items()}}
save_file(state, {out!r} + "/model.safetensors", metadata={{"format": "pt"}})
open({out!r} + "/config.json", "w").write(json.dumps(hf))
print(sum(t.numel() * t.element_size() for t in state.values()))
"""

MEASURE = r"""
import resource, sys, torch
sys.path.insert(0, {root!r})
{imports}
def rss_mb():  # current RSS from /proc, peak from getrusage (KiB on Linux)
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss_mb()
m = {load}
for t in m.state_dict().values():  # touch every weight: mmap-backed tensors count only once read
    t.sum()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(base, peak, rss_mb())
"""


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split("\n")[-2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/qwen3_1gb")
    d = Path(p.parse_args().dir)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "model.safetensors").is_file():
        run(MAKE.format(root=str(ROOT), out=str(d)))
    size_mb = (d / "model.safetensors").stat().st_size / 2**20
    print(f"checkpoint: {d} ({size_mb:.0f} MiB, bf16)")
    cases = {
        "ours": ("import weights", f"weights.from_pretrained({str(d)!r})"),
        "transformers": ("import transformers",
                         f"transformers.AutoModelForCausalLM.from_pretrained({str(d)!r}, dtype=torch.bfloat16)"),
    }
    for name, (imports, load) in cases.items():
        base, peak, after = map(float, run(MEASURE.format(root=str(ROOT), imports=imports, load=load)).split())
        print(f"{name:>13}: peak RSS above baseline {peak - base:7.0f} MiB = {(peak - base) / size_mb:.2f}x the "
              f"checkpoint (resident after load {after - base:.0f} MiB)")


if __name__ == "__main__":
    main()
