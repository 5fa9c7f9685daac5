"""The dataset check's cost on a large set of small images: cold (every image decoded, the cache written beside
the data), warm (a restart: nothing decoded), one rank, with and without worker processes.

    python bench/data_check.py [--n 100000] [--dir /tmp/data_check]

Prints seconds and images/s per case and the CPU it ran on.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import data  # noqa: E402
from machine import cpu_model  # noqa: E402
from test_data import make_model_dir  # noqa: E402


def make(d: Path, n: int) -> Path:
    (d / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if len(list((d / "img").iterdir())) < n:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / "img" / f"{i}.png")
    lines = [{"messages": [{"role": "user", "content": "<image>what colour?"}, {"role": "assistant", "content": "red"}],
              "images": [f"img/{i}.png"]} for i in range(n)]
    (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d / "train.jsonl"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dir", default="/tmp/data_check")
    args = p.parse_args()
    d = Path(args.dir)
    t0 = time.perf_counter()
    f = make(d, args.n)
    print(f"{args.n} images of 64x48 in {d} ({time.perf_counter() - t0:.1f} s to make); CPU: {cpu_model()}")
    chat = data.load_chat(make_model_dir(d / "model", "qwen3_vl", weights=False), data.DataConfig())
    samples, _ = data.load_samples([f])
    for workers in (0, os.cpu_count() - 1 or 1):
        cache = f.with_name(f.name + ".images.json")
        cache.unlink(missing_ok=True)
        for case in ("cold", "warm"):
            t0 = time.perf_counter()
            ok, _, problems = data.check_dataset(samples, chat, data.DataConfig(), num_workers=workers)
            dt = time.perf_counter() - t0
            assert len(ok) == args.n and not problems
            print(f"{case} check, {workers} worker(s): {dt:.1f} s ({args.n / dt:,.0f} images/s)")


if __name__ == "__main__":
    main()
