"""How fast PyAV decodes video on this machine, and what pixels.load_video costs per clip.

    python bench/video_decode.py [--seconds 10] [--sizes 480x640,720x1280]

Writes an H.264 clip per size (25 fps, a moving pattern), then measures, best of 3: every frame decoded (no
colour conversion: what the linter's check does), every frame decoded and converted to RGB, and load_video as
training calls it (2 fps sampled: only the kept frames are converted), for both families' settings.
"""
import argparse
import sys
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pixels  # noqa: E402
from machine import cpu_model  # noqa: E402


def write_clip(path: Path, seconds: float, h: int, w: int, fps: int = 25) -> int:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    n = int(seconds * fps)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.height, s.width, s.pix_fmt = h, w, "yuv420p"
        for t in range(n):
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.roll(base, 4 * t, axis=1), format="rgb24")))
        out.mux(s.encode())
    return n


def best(f, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def decode(path: Path, rgb: bool) -> int:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for f in c.decode(stream) if not rgb or f.to_ndarray(format="rgb24") is not None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--sizes", default="480x640,720x1280")
    p.add_argument("--out", default="/tmp/video_bench")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info}), {cpu_model()}")
    for size in args.sizes.split(","):
        h, w = map(int, size.split("x"))
        clip = out / f"clip_{h}x{w}.mp4"
        n = write_clip(clip, args.seconds, h, w)
        t_dec, t_rgb = best(lambda: decode(clip, False)), best(lambda: decode(clip, True))
        print(f"{h}x{w}, {n} frames ({args.seconds:g} s at 25 fps): decode {n / t_dec:.0f} frames/s, "
              f"decode + RGB {n / t_rgb:.0f} frames/s")
        for patch in (14, 16):
            cfg = pixels.video_config_from_dir(out / "none", patch_size=patch)
            t = best(lambda: pixels.load_video(clip, cfg))
            v = pixels.load_video(clip, cfg)
            t_pre = best(lambda: pixels.preprocess_video(v.frames, cfg))
            grid = pixels.preprocess_video(v.frames, cfg)[1][0].tolist()
            family = "Qwen3-VL" if cfg.text_timestamps else "Qwen2.5-VL"
            print(f"  {family} settings: load_video {t * 1e3:.0f} ms ({len(v.indices)} frames kept, "
                  f"{args.seconds / t:.0f}x real time), preprocess_video {t_pre * 1e3:.0f} ms, grid {grid}")


if __name__ == "__main__":
    main()
