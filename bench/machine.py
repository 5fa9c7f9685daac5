"""What machine a bench ran on, printed beside its numbers (a ratio from another CPU is not this one's)."""
import os
import platform
import subprocess

import torch


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
        extras = [f for f in ("avx512f", "amx_bf16", "avx512_bf16") if f" {f}" in flags]
    except (OSError, StopIteration, subprocess.TimeoutExpired):
        name, extras = platform.processor() or "unknown CPU", []
    return f"{name}, {os.cpu_count()} cores" + (f" ({', '.join(extras)})" if extras else "") + \
        f", torch {torch.__version__}, {torch.get_num_threads()} threads"
