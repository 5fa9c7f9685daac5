"""Staged training of the assembled VLM, flat and visible: settings, set-up, model, data, the loop.

    python train.py --stage 1 --model DIR --data FILE --out DIR                  # one process
    torchrun --nproc_per_node 8 train.py --stage 1 --model DIR --data FILE --out DIR   # FSDP2

Stage 1 trains the merger (and Qwen3-VL's deepstack mergers) with vision and LLM frozen; stage 2 trains all;
--train-vision/--no-train-vision (and -merger, -llm) override either. The output directory is an HF-layout
model directory (the next stage's --model, what sample.py and eval.py read) with checkpoints/, log.jsonl and
train_config.json beside the weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cli


@dataclass
class TrainConfig:
    # -- what to train
    model: str = ""  # HF-layout model dir (assemble's output or a previous stage's); "" = the demo's
    data: list[str] = field(default_factory=lambda: ["out/demo/data/train.jsonl"])  # .json / .jsonl files
    data_root: str = ""  # relative image paths are under it; "" = each data file's own directory
    out: str = ""  # the output model dir; "" = out/demo/stage{stage}
    force: bool = False  # clear an --out that holds anything but this run's own checkpoints
    stage: Literal[1, 2] = 1  # 1: the merger(s) only, vision and LLM frozen; 2: everything
    train_vision: bool | None = None  # None: as the stage says (and -merger, -llm likewise)
    train_merger: bool | None = None  # None: as the stage says
    train_llm: bool | None = None  # None: as the stage says
    # -- optimisation
    lr: float = 1e-4  # peak learning rate (AdamW, betas 0.9 / 0.95)
    lr_vision: float | None = None  # per-part learning rates; None = --lr
    lr_merger: float | None = None  # None = --lr
    lr_llm: float | None = None  # None = --lr
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    warmup_steps: int = 10  # linear warmup, then cosine
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    epochs: int = 1  # passes over the data
    max_steps: int = 0  # 0 = as many as --epochs passes over the data take
    batch_size: int = 1  # rows per micro-batch per rank (a row packs several samples with --pack)
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad: float = 1.0  # max gradient norm
    max_bad_steps: int = 0  # steps with a non-finite loss or gradient norm skipped before stopping
    seed: int = 0  # data order and any random init
    # -- data
    max_length: int = 4096  # tokens per row; the linter's (data.py) default too
    pack: bool = True  # bin-pack samples into rows of max_length; else one padded sample a row
    pack_window: int = 1024  # samples bin-packed together at a time
    max_pixels: int | None = None  # image bounds; None = the model dir's preprocessor_config.json
    min_pixels: int | None = None  # None = the model dir's preprocessor_config.json
    fps: float | None = None  # video frames sampled a second; None = the model dir's video_preprocessor_config.json
    max_frames: int | None = None  # frames kept of a video at most; None = the model dir's
    video_max_pixels: int | None = None  # a video's pixel bound (Qwen2.5-VL per frame, Qwen3-VL all frames)
    system_prompt: str | None = None  # None = as the chat template does; "" = none
    think: bool | None = None  # an empty or filled <think> block on the answer; None = as the chat template does
    skip_invalid: bool = False  # leave out the samples the data check rejects (listed) instead of stopping
    max_invalid: float = 0.1  # --skip-invalid stops when more than this fraction of the samples is invalid
    num_workers: int | None = None  # processes that check the data and build batches; None = min(4, cores per
    # rank - 1)
    # -- memory and speed
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # compute dtype; master weights, optimizer
    # state and gradient reduction are fp32
    reshard_after_forward: bool = True  # False: keep gathered params from forward to backward (ZeRO-2-like)
    activation_checkpointing: Literal["auto", "none", "selective", "full"] = "auto"  # selective: recompute all
    # but matmuls and attention (torchtitan's policy); auto: selective on CUDA, none on CPU
    compile: bool | None = None  # torch.compile each block; None = on CUDA
    peak_tflops: float = 0.0  # the device's bf16 dense peak for MFU; 0 = from its name (flops.PEAK_TFLOPS)
    # -- LoRA
    lora_rank: int = 0  # 0 = no LoRA; R > 0: rank-R adapters on --lora-parts, whose weights then stay frozen
    lora_alpha: float = 32.0  # the adapters' scale is alpha / rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # Linear names, comma-separated
    # (vision blocks: qkv, proj, and their MLP's)
    lora_parts: str = "llm"  # llm | vision | llm,vision (never the mergers, embeddings or lm_head)
    lora_rslora: bool = False  # scale alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
    # -- checkpoints and logs
    log_every: int = 1  # steps per log line (log.jsonl)
    save_every: int = 250  # steps per checkpoint (0 = none before the end); --resume continues from the newest
    keep_last: int = 2  # checkpoints kept (0 = all)
    resume: bool = False  # continue from the newest complete checkpoint under --out
    max_shard_size: str = "4GB"  # of the output model's safetensors files

    def __post_init__(self):
        cli.at_least(self, 1, "epochs", "batch_size", "grad_accum", "max_length", "pack_window", "log_every",
                     "max_pixels", "min_pixels", "max_frames", "video_max_pixels")
        cli.at_least(self, 0, "max_steps", "warmup_steps", "save_every", "keep_last", "weight_decay", "peak_tflops",
                     "max_bad_steps", "num_workers", "lora_rank")
        cli.at_least(self, 0, "lr", "lr_vision", "lr_merger", "lr_llm", "clip_grad", "fps", strict=True)
        if not set(self.lora_parts.split(",")) <= {"llm", "vision"}:
            raise ValueError(f"--lora-parts {self.lora_parts}: llm, vision or llm,vision")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio {self.min_lr_ratio}: must be within 0..1")


def parse_args(argv=None) -> TrainConfig:
    p = cli.parser(TrainConfig, __doc__)
    cfg = cli.settings(TrainConfig, p.parse_args(argv), p)
    # with no --model / --out: the demo's models (python demo.py makes them), stage 1 from the assembled model
    demo = "out/demo/assembled" if cfg.stage == 1 else "out/demo/stage1"
    if not cfg.model and not (Path(demo) / "config.json").is_file():
        p.error(f"no --model given and the demo's {demo} does not exist yet: `python demo.py` makes it (the demo's "
                "world, donors and assembled model, offline, minutes on a CPU), or pass --model DIR --data FILE")
    for path in [cfg.model or demo, *cfg.data]:
        if not Path(path).exists():
            p.error(f"{path} does not exist")
    return dataclasses.replace(cfg, model=cfg.model or demo, out=cfg.out or f"out/demo/stage{cfg.stage}")


if __name__ == "__main__":  # parse before the heavy imports below, so --help and a bad flag answer at once
    CFG = parse_args()

import fcntl  # noqa: E402 (the heavy imports come after the settings: see above)
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed._composable import checkpoint  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     set_model_state_dict)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import flops  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402
import resume  # noqa: E402
import weights  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# set-up


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous, also across nodes); without them this is
    one process on a one-rank group, so that 1 and N processes train the same FSDP2 model: one compute dtype for
    weights, activations and the residual stream, fp32 master weights and gradient reduction."""
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local)
    kw = dict(device_id=device) if cuda else {}
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo", **kw)
    else:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1, **kw)
    return dist.get_rank(), dist.get_world_size(), device


def part_of(name: str) -> str:
    """vision | merger | llm, by parameter name (the names mirror the checkpoint)."""
    if name.startswith("visual.merger.") or name.startswith("visual.deepstack_merger_list."):
        return "merger"
    return "vision" if name.startswith("visual.") else "llm"


def set_trainable(model: M.VLM, cfg: TrainConfig) -> dict[str, bool]:
    """Which parts train (the stage's default, or --train-*); a part with LoRA adapters is frozen unless a
    --train-* flag says otherwise, and its adapters train."""
    stage_default = {1: dict(vision=False, merger=True, llm=False), 2: dict(vision=True, merger=True, llm=True)}
    adapted = cfg.lora_parts.split(",") if cfg.lora_rank else []
    train = {part: (stage_default[cfg.stage][part] and part not in adapted) if flag is None else flag
             for part, flag in (("vision", cfg.train_vision), ("merger", cfg.train_merger), ("llm", cfg.train_llm))}
    for name, p in model.named_parameters():
        p.requires_grad_(train[part_of(name)])
    lora.set_lora_trainable(model)  # each adapted Linear: its weight and bias frozen, A and B trained
    return train


def lora_config(cfg: TrainConfig) -> lora.LoRAConfig | None:
    if not cfg.lora_rank:
        return None
    return lora.LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=tuple(cfg.lora_targets.split(",")), parts=tuple(cfg.lora_parts.split(",")),
                           use_rslora=cfg.lora_rslora)


def load_model(cfg: TrainConfig, device: torch.device) -> tuple[M.VLM, dict, torch.dtype]:
    """The model with fp32 master weights, trainable parts set, checkpointing, compile and FSDP2 applied.

    torchtitan's way, on any number of ranks (one included): every rank builds the model on the meta device and
    shards it from outside: each vision block and decoder layer a unit, the embeddings a unit, the lm_head a unit
    kept gathered from forward to backward (a tied lm_head stays with the embeddings in the root: one matrix),
    then the root (patch embed, mergers, final norm). Rank 0 alone reads the checkpoint and broadcasts it into
    the shards. Parameters are cast to the compute dtype for forward and backward; forward inputs are not cast
    (the vision RoPE tables stay fp32, as in transformers); gradients are reduced in fp32.
    Returns the model, its HF config and the dtype the checkpoint stores (the final save keeps it).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    hf_config, model_cfg = weights.read_model_config(Path(cfg.model))
    with torch.device("meta"):
        model = M.VLM(model_cfg)
    if (Path(cfg.model) / "adapter_config.json").is_file():
        raise SystemExit(f"error: {cfg.model} holds a LoRA adapter beside its weights: merge it first (python "
                         f"convert.py merge-lora --model {cfg.model} --adapter {cfg.model} --out DIR), then --model DIR")
    rank = dist.get_rank()
    state = weights.load_state_dict(cfg.model, model) if rank == 0 else {}  # the checkpoint's names
    stored = [state["model.embed_tokens.weight"].dtype if rank == 0 else None]
    dist.broadcast_object_list(stored, src=0)
    if (lcfg := lora_config(cfg)) is not None:  # on meta, before sharding: A and B shard with their layer
        lora.apply_lora(model, lcfg)
        if rank == 0:  # one draw, broadcast with the weights: A as PEFT initialises it, B = 0
            state |= lora.lora_init_state(model, cfg.seed)
    set_trainable(model, cfg)
    blocks = [*(model.visual.blocks if model.visual is not None else []), *model.model.layers]
    ac = cfg.activation_checkpointing
    ac = ("selective" if device.type == "cuda" else "none") if ac == "auto" else ac
    for block in blocks:  # innermost first: checkpointing, then compile, then sharding (torchtitan's order)
        if ac != "none":
            checkpoint(block, **({"context_fn": selective_policy} if ac == "selective" else {}))
        if cfg.compile or (cfg.compile is None and device.type == "cuda"):
            block.compile()
    compute = getattr(torch, cfg.dtype)
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    if not model.cfg.text.tie_word_embeddings:
        fully_shard(model.model.embed_tokens, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(model.lm_head, mp_policy=mp, reshard_after_forward=False)  # backward starts with it
    fully_shard(model, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    model.to_empty(device=device)
    set_model_state_dict(model, {k: v.float() for k, v in state.items()},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, hf_config, stored[0]


# torchtitan's op-level selective activation checkpointing: keep the outputs of matmuls and attention kernels
# (the expensive ops), recompute everything else (norms, RoPE, activations, casts) in backward
SAVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


def selective_policy():
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def memory_estimate(model, world: int, dtype: torch.dtype) -> str:
    """Per-GPU bytes of what sharding decides (activations not included): fp32 master weights (all parameters),
    fp32 gradients and AdamW's two fp32 moments (trainable ones), each over `world` ranks; plus the largest
    unit gathered in the compute dtype, twice (the next one is prefetched)."""
    params = {n: p for n, p in model.named_parameters()}
    n_all = sum(p.numel() for p in params.values())
    n_train = sum(p.numel() for p in params.values() if p.requires_grad)
    unit = max(sum(p.numel() for p in b.parameters()) for b in [*model.model.layers, model.lm_head])
    gb = [4 * n_all / world / 1e9, 4 * n_train / world / 1e9, 8 * n_train / world / 1e9,
          2 * unit * dtype.itemsize / 1e9]
    return (f"memory per rank (of {world}): weights {gb[0]:.2f} GB + grads {gb[1]:.2f} + AdamW {gb[2]:.2f} + "
            f"gathered units {gb[3]:.2f} = {sum(gb):.2f} GB, before activations")


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:  # linear warmup, then cosine from 1 to min_lr_ratio
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


# ----------------------------------------------------------------------------------------------------------------
# the output model (training checkpoints are resume.py's)


def save_hf(out: Path, model, hf_config: dict, dtype: torch.dtype, cfg: TrainConfig, rank: int) -> None:
    """The consolidated HF-layout model: the next stage's --model, what sample.py and eval.py read. With LoRA,
    the base (its fully trained parts included) and beside it the adapter in PEFT's layout (fp32, as PEFT keeps
    adapters): PEFT, vLLM (--lora-modules) and sample.py / eval.py --adapter read it."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        base, adapter = lora.split_state(state)
        weights.save_state_dict({k: v.to(dtype) for k, v in base.items()}, out, hf_config,
                                max_shard_size=cfg.max_shard_size)
        if adapter:
            lora.save_adapter(model, lora_config(cfg), out, str(out.resolve()), state=adapter)
        weights.copy_model_files(cfg.model, out)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order (the data check's shares)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


def clip_grad_norm(params: list, max_norm: float, device: torch.device) -> torch.Tensor:
    """clip_grad_norm_ with the sum of squares in float64: one process's sum and N ranks' partial sums of their
    shards then round to the same fp32 norm, so 1 and N processes clip by the same factor (fp32 partial sums
    differ in their last bits, and AdamW turns that into weights 4e-7 apart after 3 steps). Returns the norm."""
    shards = [resume.local(p.grad) for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in shards:
        total += g.double().pow(2).sum()
    dist.all_reduce(total)
    norm = total.sqrt().float()
    torch._foreach_mul_(shards, (max_norm / (norm + 1e-6)).clamp(max=1.0))  # in place, on the local shards
    return norm


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


# ----------------------------------------------------------------------------------------------------------------
# the loop

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", "doc_ids", *data.MEDIA)


def main(cfg: TrainConfig) -> None:
    rank, world, device = setup_distributed()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        watch_parent()
    try:
        train(cfg, rank, world, device)
    except (ValueError, OSError) as e:  # what the user passed in, or a full disk: one line (DEBUG=1: the traceback)
        if os.environ.get("DEBUG"):
            raise
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        done = sorted(Path(cfg.out).glob("checkpoints/step_????????"))
        where = (f"the same command with --resume continues from {done[-1]}" if done else
                 f"no checkpoint was written yet (one every --save-every {cfg.save_every} steps)")
        raise SystemExit(f"\ninterrupted: {where}") from None
    finally:
        if LOCK is not None:
            LOCK.close()  # releases --out for the next run
        # FSDP's state holds the process group (through its device mesh) in reference cycles: collect them while
        # the interpreter is alive, so the group really ends here; left to interpreter exit, gloo's threads could
        # abort a rank ("terminate called without an active exception": 4 runs in 25 of test_train on 2 cores)
        gc.collect()
        dist.destroy_process_group()


LOCK = None  # rank 0's open lock file on --out, held for the life of the process


def claim_out(cfg: TrainConfig, rank: int) -> None:
    """One run per --out: rank 0 takes --out/.lock (a second run, or the orphans of a killed launcher, cannot),
    and --out must be new, empty, or this run's own (checkpoints to --resume from); --force clears anything else
    first. Rank 0 decides for every rank before it changes anything."""
    global LOCK
    out, problem, held = Path(cfg.out), None, []
    if rank == 0:
        if out.exists() and not out.is_dir():
            problem = f"error: --out {out} is a file, not a directory"
        else:
            out.mkdir(parents=True, exist_ok=True)
            new_lock = not (out / ".lock").exists()
            LOCK = open(out / ".lock", "a+")
            try:
                fcntl.flock(LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                problem = f"error: another run is training into {out} (it holds {out / '.lock'}): wait for it or stop it"
        held = sorted(p.name for p in out.iterdir() if p.name != ".lock") if not problem else []
        own = cfg.resume and (out / "checkpoints").is_dir()
        if held and not own and not cfg.force and not problem:
            what = "a model (config.json and weights)" if "config.json" in held else \
                f"{len(held)} file(s) ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''})"
            problem = (f"error: --out {out} already holds {what}: choose a new --out, --resume to continue the run "
                       "whose checkpoints are there, or --force to clear it first")
        if held and not own and not problem:
            for p in out.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            print(f"--force: cleared {out} ({len(held)} entries)")
    if problem and LOCK is not None:  # refused: leave --out as it was
        LOCK.close()
        LOCK = None
        if new_lock and "another run" not in problem:
            (out / ".lock").unlink()
    decision = [problem]
    dist.broadcast_object_list(decision, src=0)
    if decision[0]:
        raise SystemExit(decision[0])


def watch_parent() -> None:
    """Under torchrun: stop when the launcher is gone (killed with -9, its workers would be re-parented and train
    on, writing checkpoints nobody waits for)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(2)
            if os.getppid() != parent:
                print(f"rank {os.environ.get('RANK')}: the launcher (pid {parent}) is gone: stopping", flush=True)
                os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> None:
    out = Path(cfg.out)
    claim_out(cfg, rank)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # data first: a broken dataset fails before any weights are read (the same check as `python data.py`)
    workers = cfg.num_workers if cfg.num_workers is not None else max(0, min(4, (os.cpu_count() or 1) // world - 1))
    dcfg = data.DataConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(data.DataConfig)})
    chat = data.load_chat(cfg.model, dcfg)
    samples, problems = data.load_samples(cfg.data, dcfg.data_root)
    n_read = len(samples) + len({p.where for p in problems})
    samples, summary, more = data.check_dataset(samples, chat, dcfg, workers, rank, world, all_gather)
    problems += more
    if rank == 0:
        print(summary)
    if problems:
        if rank == 0:
            print(data.describe_problems(problems))
        dropped = 1 - len(samples) / max(n_read, 1)
        if not cfg.skip_invalid:
            raise SystemExit(f"refusing to train on {len(problems)} problem(s) in the data (listed above): fix "
                             "them, or pass --skip-invalid to leave those samples out")
        if dropped > cfg.max_invalid or not samples:
            raise SystemExit(f"--skip-invalid would leave out {dropped:.0%} of the {n_read} samples, more than "
                             f"--max-invalid {cfg.max_invalid:.0%}: the data needs fixing first")
        if rank == 0:
            print(f"--skip-invalid: training without those samples, on {len(samples)} of {n_read}")
    loader = data.Loader(samples, chat, dcfg, rank, world, cfg.seed, workers, pin_memory=device.type == "cuda")
    steps_per_epoch = [len(loader.plan(e)[0]) // cfg.grad_accum for e in range(cfg.epochs)]
    total_steps = cfg.max_steps or sum(steps_per_epoch)
    if rank == 0:
        print(f"{total_steps} steps; epoch 0: {steps_per_epoch[0]} steps of {world} rank(s) x {cfg.grad_accum} "
              f"micro-batch(es) x {cfg.batch_size} row(s), {loader.efficiency(0):.1%} of token slots real")

    model, hf_config, stored_dtype = load_model(cfg, device)
    parts = {}  # part -> [parameters, trainable] (a DTensor's numel is its full size, not the shard's)
    for name, p in model.named_parameters():
        counts = parts.setdefault(part_of(name), [0, 0])
        counts[0] += p.numel()
        counts[1] += p.numel() if p.requires_grad else 0
    if rank == 0:
        for part, (n, trainable) in parts.items():
            print(f"{part:>7}: {n / 1e6:9.3f}M parameters, {trainable / 1e6:9.3f}M trainable")
        print(memory_estimate(model, world, getattr(torch, cfg.dtype)))

    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(part_of(name), []).append(p)
    part_lr = {"vision": cfg.lr_vision, "merger": cfg.lr_merger, "llm": cfg.lr_llm}
    optimizer = torch.optim.AdamW(  # state only for trainable parameters: frozen ones never enter it
        [{"params": ps, "lr": part_lr[part] or cfg.lr, "name": part} for part, ps in groups.items()],
        betas=(0.9, 0.95), weight_decay=cfg.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    step, position = resume.load_checkpoint(out, model, optimizer, scheduler, cfg, rank, world) if cfg.resume \
        else (0, (0, 0))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    def micro_batches(epoch: int, offset: int):
        """This rank's batches from (epoch, offset) on, across epochs, each with the position right after it;
        grad_accum batches make a step, and an epoch's last partial step is not taken."""
        while True:
            plan = loader.plan(epoch)[0]
            done = int(np.searchsorted(np.cumsum([0] + [sum(map(len, b)) for b in plan]), offset))  # batches before
            full = len(plan) // cfg.grad_accum * cfg.grad_accum
            for i, batch in enumerate(loader.batches(epoch, start=offset), done):
                if i >= full:
                    break
                yield batch, (epoch, loader.offset) if i + 1 < full else (epoch + 1, 0)
            epoch, offset = epoch + 1, 0

    batches = micro_batches(*position)
    # what trains, as set_trainable decided it (a LoRA part has trainable adapters only: False), for flops.step_flops
    trained = {part: part in parts and parts[part][0] == parts[part][1] for part in ("vision", "merger", "llm")}
    peak = flops.peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "", cfg.peak_tflops)
    log = None
    if rank == 0:  # a resumed run replays from its checkpoint: the lines after it are superseded
        old = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").is_file() else []
        (out / "log.jsonl").write_text("".join(line + "\n" for line in old if json.loads(line)["step"] <= step))
        log = open(out / "log.jsonl", "a")
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc=f"stage {cfg.stage}")
    model.train()
    bad_steps = 0
    t0, seen = time.perf_counter(), torch.zeros(3, device=device)  # real tokens, samples, model FLOPs since the log
    while step < total_steps:
        micro = []
        for _ in range(cfg.grad_accum):
            batch, position = next(batches)  # position: where a run resumed after this step picks up
            micro.append(batch)
        # the loss is summed over label tokens and divided by their count over every micro-batch and rank
        n_labels = all_sum(torch.tensor(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)),
                                        device=device), world)
        loss_sum = torch.zeros((), device=device)
        for b in micro:
            inputs = {k: b[k].to(device, non_blocking=True) for k in MODEL_INPUTS if b.get(k) is not None}
            s = model(**inputs, vision_always=True)  # in the compute dtype: FSDP2 casts the parameters
            # FSDP averages gradients over ranks: times world turns that mean back into the global sum
            (s * world / n_labels.clamp(min=1)).backward()
            loss_sum += s.detach()
        norm = clip_grad_norm([p for g in groups.values() for p in g], cfg.clip_grad, device)
        loss = (all_sum(loss_sum, world) / n_labels.clamp(min=1)).item()
        if not (math.isfinite(loss) and math.isfinite(norm.item())):  # never step on (or save) a non-finite model
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            broken = next((n for n, p in model.named_parameters() if not torch.isfinite(resume.local(p)).all()), None)
            what = (f"step {step + 1}: loss {loss}, gradient norm {norm.item()}"
                    + (f"; parameter {broken} is already not finite" if broken else ""))
            if bad_steps > cfg.max_bad_steps:
                raise SystemExit(f"error: {what}: stopped, nothing saved (the newest checkpoint, if any, is the last "
                                 f"good state; --max-bad-steps N skips up to N such steps)")
            if rank == 0:
                print(f"skipping {what} ({bad_steps} of --max-bad-steps {cfg.max_bad_steps})")
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()

        seen += torch.tensor([sum(float(b["attention_mask"].sum()) for b in micro),  # real tokens
                              sum(float(b["doc_ids"].amax(-1).sum()) if "doc_ids" in b else len(b["input_ids"])
                                  for b in micro),  # samples: documents of packed rows
                              sum(flops.step_flops(model.cfg, b, trained) for b in micro)], device=device)
        if step % cfg.log_every == 0 or step == total_steps:
            dt, t0 = time.perf_counter() - t0, time.perf_counter()
            tokens, samples, model_flops = all_sum(seen, world).tolist()
            seen = torch.zeros(3, device=device)
            row = dict(step=step, loss=loss, lr=scheduler.get_last_lr()[0], grad_norm=norm.item(),
                       tokens_per_s=tokens / dt, samples_per_s=samples / dt, peak_mem_gb=peak_memory_gb(device))
            if device.type == "cuda" or cfg.peak_tflops:  # model FLOPs of every rank / their peak (flops.py)
                row["mfu"] = model_flops / dt / (world * peak)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            resume.save_checkpoint(out, step, position, model, optimizer, scheduler, cfg, rank, world)
    bar.close()
    save_hf(out, model, hf_config, stored_dtype, cfg, rank)
    if rank == 0:
        print(f"saved {out} (HF layout: the next stage's --model)")


if __name__ == "__main__":
    main(CFG)
