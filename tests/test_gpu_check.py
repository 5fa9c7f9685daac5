"""bench/gpu_check.py --tiny runs every part on CPU and writes every number, finite: the GPU script cannot rot."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [f"train_{mode}_{what}" for mode in ("none", "selective", "full")
         for what in ("first_step_s", "step_s", "tokens_per_s", "mfu", "peak_mem_gb", "loss")]
DECODE = [f"decode_tiny_{T}_{what}" for T in (16, 64)
          for what in ("tokens_per_s", "limit_tokens_per_s", "fraction_of_limit", "ttft_ms", "compile_s")]
EXPECTED = ["attn_out_max_diff", "attn_dq_max_diff", "attn_dk_max_diff", "attn_dv_max_diff", "attn_out_max_abs",
            "fsdp_loss_plain", "fsdp_loss_fsdp2", "fsdp_loss_diff", "train_tokens_per_step",
            "train_model_tflop_per_step", *TRAIN, "hbm_bandwidth_gb_s", *DECODE, "eval_b1_samples_per_s",
            "eval_b8_samples_per_s", "part_setup_s", "part_attention_s", "part_fsdp_s", "part_train_s",
            "part_decode_s", "video_prompt_tokens", "video_prefill_tokens_per_s", "video_logits_max_diff_bf16_fp32",
            "video_logits_max_abs", "video_logits_diff_frames_reversed", "part_video_s", "total_s"]


def test_tiny_run_writes_every_number(tmp_path):
    out = tmp_path / "gpu_check.json"
    # --peak-tflops: a CPU has no entry in flops.PEAK_TFLOPS, so MFU would be nan
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(out),
                        "--peak-tflops", "1"], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["errors"] == {} and got["skipped"] == [], (got["errors"], got["skipped"])
    assert got["attn_kernel"] == "sdpa" and got["device"] == "cpu"
    missing = [k for k in EXPECTED if k not in got]
    assert not missing, missing
    assert all(math.isfinite(got[k]) for k in EXPECTED), {k: got[k] for k in EXPECTED if not math.isfinite(got[k])}
    positive = [k for k in EXPECTED if k.endswith(("tokens_per_s", "samples_per_s", "_mfu", "gb_s", "ttft_ms",
                                                   "step_s", "peak_mem_gb", "tflop_per_step", "fraction_of_limit"))]
    assert all(got[k] > 0 for k in positive), {k: got[k] for k in positive if not got[k] > 0}
    # bf16 kernels against the fp32 reference: rounding (outputs ~2, so ~1e-2), not a wrong mask (~1)
    assert max(got[f"attn_{k}_max_diff"] for k in ("out", "dq", "dk", "dv")) < 0.05
    # bf16 rounding, not a bug; and the frames matter: reversed, they move the logits more than rounding does
    assert got["video_logits_max_diff_bf16_fp32"] < 0.1 * got["video_logits_max_abs"]
    assert got["video_logits_diff_frames_reversed"] > 2 * got["video_logits_max_diff_bf16_fp32"]
    assert got["fsdp_loss_diff"] < 1e-3 and math.isclose(got["fsdp_loss_plain"], math.log(512), rel_tol=0.1)
    lines = r.stdout.splitlines()  # one `name: value unit` line per number
    assert all(any(line.startswith(f"{k}: ") for line in lines) for k in EXPECTED if k != "total_s")
