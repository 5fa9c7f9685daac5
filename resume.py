"""Training checkpoints: written atomically, pickle-free and checksummed; resumed only where they can be continued
exactly. train.py calls save_checkpoint every --save-every steps and load_checkpoint on --resume.

    checkpoints/step_00000250/   rank_R.safetensors   this rank's shards of the trainable weights + AdamW state
                                 rank_R.json          its data position (epoch, offset) and numpy/python RNG
                                 trainer.json         written last: step, scheduler, world size, the settings that
                                                      shape the data order, every file's size and CRC-32
"""
import json
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

# Each rank writes its own shards of the trainable parameters and their AdamW state (frozen ones are in --model
# already) to rank_R.safetensors, and its data position and random state to rank_R.json; rank 0 writes trainer.json
# last, the manifest: step, scheduler, the settings that shape the data order, and every file's size and CRC-32.
# No pickle anywhere: a checkpoint directory is data, never code. A checkpoint resumes on the world size it was
# written with (the shards and the per-rank data offsets depend on it).
RESUME_SETTINGS = ("stage", "batch_size", "grad_accum", "max_length", "pack", "pack_window", "seed", "data",
                   "epochs", "lora_rank", "lora_targets", "lora_parts",
                   "max_pixels", "min_pixels", "fps", "max_frames", "video_max_pixels")  # these set sample lengths


def checkpoint_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """This rank's shards: param.<name> and its optimizer state <name>.exp_avg / exp_avg_sq / step, trainable only
    (a frozen lm_head tied to the embeddings is not listed by named_parameters, so never saved twice)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[f"param.{name}"] = local(p)
            for key, t in optimizer.state.get(p, {}).items():
                out[f"optim.{name}.{key}"] = local(t)
    return out


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def crc32(file: Path) -> int:
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def save_checkpoint(out: Path, step: int, position: tuple[int, int], model, optimizer, scheduler, cfg,
                    rank: int, world: int):
    final, tmp = out / "checkpoints" / f"step_{step:08d}", out / "checkpoints" / f"step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors = {k: v.detach().cpu().contiguous() for k, v in checkpoint_tensors(model, optimizer).items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, tmp / f"rank_{rank}.safetensors")
    (tmp / f"rank_{rank}.json").write_text(json.dumps(dict(
        data=list(position), numpy=[x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()],
        python=[list(x) if isinstance(x, tuple) else x for x in random.getstate()])))
    files = [None] * world
    dist.all_gather_object(files, {f.name: [f.stat().st_size, crc32(f)] for f in tmp.glob(f"rank_{rank}.*")})
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(dict(
            step=step, scheduler=scheduler.state_dict(), world_size=world,
            settings={k: getattr(cfg, k) for k in RESUME_SETTINGS}, files={k: v for f in files for k, v in f.items()}),
            indent=1))
        shutil.rmtree(final, ignore_errors=True)  # a damaged one of this step, skipped by the resume
        tmp.rename(final)  # the checkpoint exists only once it is whole
        if cfg.keep_last:  # 0 keeps them all
            for old in sorted(out.glob("checkpoints/step_????????"))[: -cfg.keep_last]:
                shutil.rmtree(old)
    dist.barrier()


def damage(path: Path, rank: int, world: int, cfg) -> str | None:
    """What is wrong with checkpoint `path` for this run (None: it is whole), checked by every rank for its files."""
    try:
        trainer = json.loads((path / "trainer.json").read_text())
        files = trainer["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path / 'trainer.json'} is missing or not the manifest ({type(e).__name__}: {e})"
    if trainer.get("world_size") != world:
        return f"{path} was written by {trainer.get('world_size')} processes, this run has {world}"
    changed = [k for k in RESUME_SETTINGS if trainer.get("settings", {}).get(k) != getattr(cfg, k)]
    if changed:
        k = changed[0]
        return (f"{path} was written with --{k.replace('_', '-')} {trainer['settings'].get(k)!r}, this run has "
                f"{getattr(cfg, k)!r}: the data order (or the parameters) would differ")
    for name in (f"rank_{rank}.safetensors", f"rank_{rank}.json"):
        f = path / name
        if not f.is_file() or [f.stat().st_size, crc32(f)] != files.get(name):
            return f"{f} is missing or damaged (size or CRC-32 differs from trainer.json)"
    return None


def load_checkpoint(out: Path, model, optimizer, scheduler, cfg, rank: int,
                    world: int) -> tuple[int, tuple[int, int]]:
    """Restore the newest whole checkpoint (a damaged one is reported and the one before it tried); returns its
    step and this rank's data position (epoch, offset); (0, (0, 0)) when there is none."""
    for path in sorted(out.glob("checkpoints/step_????????"), reverse=True):
        problems = [None] * world
        dist.all_gather_object(problems, damage(path, rank, world, cfg))
        if problem := next((p for p in problems if p), None):
            if "data order" in problem or "processes" in problem:
                raise SystemExit(f"error: --resume: {problem}; resume with the settings it was written with")
            if rank == 0:
                print(f"--resume: skipping {path.name}: {problem}")
            continue
        tensors = load_file(path / f"rank_{rank}.safetensors")
        for name, p in model.named_parameters():  # AdamW's state exists only after a step: make it, then fill it
            if p.requires_grad and f"optim.{name}.step" in tensors:
                optimizer.state[p] = dict(step=torch.zeros(()), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))
        want = checkpoint_tensors(model, optimizer).keys() | {k for k in tensors if k.startswith("rng.")}
        if want != tensors.keys():
            raise SystemExit(f"error: --resume: {path} holds other trainable parameters than this run (different "
                             f"--stage, --train-* or --lora-* flags?): {sorted(want ^ tensors.keys())[:4]}")
        with torch.no_grad():
            for key, t in checkpoint_tensors(model, optimizer).items():
                t.copy_(tensors[key])
        trainer = json.loads((path / "trainer.json").read_text())
        mine = json.loads((path / f"rank_{rank}.json").read_text())
        scheduler.load_state_dict(trainer["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):  # the lr of the step to come
            group["lr"] = lr
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        np.random.set_state((mine["numpy"][0], np.array(mine["numpy"][1], dtype=np.uint32), *mine["numpy"][2:]))
        random.setstate((mine["python"][0], tuple(mine["python"][1]), mine["python"][2]))
        if rank == 0:
            print(f"resumed from {path} at step {trainer['step']} (epoch {mine['data'][0]}, sample {mine['data'][1]})")
        return trainer["step"], tuple(mine["data"])
    if rank == 0:
        print(f"--resume: no complete checkpoint under {out / 'checkpoints'} yet: starting a fresh run")
    return 0, (0, 0)
