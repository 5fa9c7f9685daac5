"""train.py on CPU: frozen parts stay bitwise, FSDP on 2 processes == 1 process, resume == uninterrupted, a
text-only rank beside an image rank, the data check, and a loss that falls."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cli import comments
import model as M
import train
import weights
from test_data import make_model_dir
from test_data_video import moving_square, write_clip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("qwen3vl"), "qwen3_vl")


def write_dataset(root: Path, n: int, text_only: set[int] = frozenset(), seed: int = 0) -> Path:
    """n one-turn samples "what colour is this?" -> the colour word; images 64x48 of that colour."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "white": (250, 250, 250)}
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = list(colours)[i % len(colours)]
        if i in text_only:
            lines.append({"messages": [{"role": "user", "content": f"say {name}"},
                                       {"role": "assistant", "content": name}]})
            continue
        pixels = np.clip(np.array(colours[name]) + rng.integers(-20, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        lines.append({"messages": [{"role": "user", "content": "<image>what colour is this?"},
                                   {"role": "assistant", "content": name}], "images": [f"img/{i}.png"]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def config(model_dir, data, out, **kw) -> train.TrainConfig:
    base = dict(model=str(model_dir), data=[str(data)], out=str(out), dtype="float32", max_length=128, lr=1e-3,
                warmup_steps=1, pack=False, batch_size=1, log_every=1)
    return train.TrainConfig(**{**base, **kw})


def cli(cfg: train.TrainConfig) -> list[str]:
    args = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if v is None:
            continue
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, list):
            args += [flag, *v]
        else:
            args += [flag, str(v)]
    return args


def torchrun(cfg: train.TrainConfig, nproc: int):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 1000), str(ROOT / "train.py"), *cli(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_stage1_trains_only_the_mergers(model_dir, tmp_path):
    data = write_dataset(tmp_path / "d", 4)
    cfg = config(model_dir, data, tmp_path / "out", stage=1, max_steps=3, save_every=2, keep_last=1)
    train.main(cfg)
    before, after = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    mergers = {k for k in before if ".merger." in k or ".deepstack_merger_list." in k}
    assert changed and changed <= mergers, changed - mergers  # every other tensor bitwise unchanged
    assert len(changed) >= len(mergers) - 4  # (norm weights may stay put at a small lr; linears move)
    # the checkpoint holds optimizer state (and weights) for the merger parameters only
    keys = load_file(tmp_path / "out" / "checkpoints" / "step_00000002" / "rank_0.safetensors").keys()
    state_keys = [k for k in keys if k.startswith(("optim.", "param."))]
    assert state_keys and all("merger" in k for k in state_keys), [k for k in state_keys if "merger" not in k][:3]
    # and the output directory is a model dir our loader reads
    assert isinstance(weights.from_pretrained(tmp_path / "out"), M.VLM)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp_two_processes_equal_one(model_dir, tmp_path, dtype):
    """Same global batch: 1 process x 2 micro-batches vs 2 ranks x 1 (gloo, FSDP2). Both runs are FSDP2 (one on a
    one-rank group) on one thread per process, so each micro-batch's forward and backward run the same kernels in
    the same order on any CPU. What can differ is the order of sums: the two micro-batches' gradients (autograd
    accumulation vs gloo's reduce: a + b == b + a in IEEE arithmetic, exact) and the gradient norm's partial sums
    (one tensor vs two shards), which train.clip_grad_norm adds in float64, so both round to the same fp32 norm.
    Nothing is left to differ: the runs are bitwise equal in fp32 and in bf16 (fp32 master weights, fp32
    reduction), asserted with a margin of 1e-6. Measured before the float64 norm: 4.1e-7 (fp32 weights), 4.8e-7
    (fp32 losses), which made a 1e-5 bound on weights fail on other CPUs."""
    data = write_dataset(tmp_path / "d", 8)
    one = config(model_dir, data, tmp_path / "one", stage=2, max_steps=3, grad_accum=2, dtype=dtype)
    two = config(model_dir, data, tmp_path / "two", stage=2, max_steps=3, grad_accum=1, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1 below: the same matmul blocking in both runs
    try:
        train.main(one)
    finally:
        torch.set_num_threads(threads)
    torchrun(two, 2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    dw = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    print(f"{dtype}: 1 process: {a}\n2 processes: {b}\nmax weight difference {dw:.3g}")
    assert len(a) == len(b) == 3 and a[0] != a[-1]  # it trained
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6 and dw <= 1e-6


def test_text_only_rank_beside_image_rank(model_dir, tmp_path):
    """Two samples, one with an image and one without: each of the 2 ranks gets one; nothing hangs."""
    data = write_dataset(tmp_path / "d", 2, text_only={1})
    two = config(model_dir, data, tmp_path / "two", stage=1, epochs=3, grad_accum=1)
    torchrun(two, 2)
    one = config(model_dir, data, tmp_path / "one", stage=1, epochs=3, grad_accum=2)
    train.main(one)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5



def test_video_rank_beside_image_rank(model_dir, tmp_path):
    """A video sample on one rank, an image sample on the other (the tower runs on frames there, on an image
    here): nothing hangs, and 2 ranks equal 1 process of 2 micro-batches."""
    data = write_dataset(tmp_path / "d", 2)
    write_clip(tmp_path / "d" / "clip.mp4", moving_square(12, 48, 64))
    lines = data.read_text().splitlines()
    lines[1] = json.dumps({"messages": [{"role": "user", "content": "<video>which way does it move?"},
                                        {"role": "assistant", "content": "right"}], "video": "clip.mp4"})
    data.write_text("\n".join(lines) + "\n")
    two = config(model_dir, data, tmp_path / "two", stage=2, epochs=2, grad_accum=1)
    torchrun(two, 2)
    one = config(model_dir, data, tmp_path / "one", stage=2, epochs=2, grad_accum=2)
    train.main(one)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 2 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5 and a[0] != a[1]

def test_resume_equals_uninterrupted(model_dir, tmp_path):
    """5 samples, 2 micro-batches a step: 2 steps an epoch and one sample left over, which the run skips; the
    step-2 checkpoint sits exactly at the end of epoch 0, so resuming must start epoch 1, not the leftover."""
    data = write_dataset(tmp_path / "d", 5)
    full = config(model_dir, data, tmp_path / "full", stage=2, epochs=3, grad_accum=2, save_every=2, keep_last=5)
    train.main(full)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    # a run "killed" after step 2: only its step-2 checkpoint (and a half-written one, which must be ignored)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000002", part / "checkpoints" / "step_00000002")
    (part / "checkpoints" / "step_00000004.tmp").mkdir()
    train.main(dataclasses.replace(full, out=str(part), resume=True))
    assert losses(part) == losses(tmp_path / "full")[2:]
    w1, w2 = load_file(tmp_path / "full" / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_refuses_bad_data_unless_told_to_skip(model_dir, tmp_path):
    data = write_dataset(tmp_path / "d", 3)
    with open(data, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "<image> two placeholders <image>"}, '
                '{"role": "assistant", "content": "x"}], "images": ["img/0.png"]}\n')
    cfg = config(model_dir, data, tmp_path / "out", max_steps=1)
    with pytest.raises(SystemExit, match="refusing to train on 1 problem"):
        train.main(cfg)
    with pytest.raises(SystemExit, match=r"would leave out 25% of the 4 samples, more than --max-invalid 10%"):
        train.main(dataclasses.replace(cfg, skip_invalid=True))
    train.main(dataclasses.replace(cfg, skip_invalid=True, max_invalid=0.5))
    assert len(losses(tmp_path / "out")) == 1


def test_loss_falls(model_dir, tmp_path):
    data = write_dataset(tmp_path / "d", 8)
    cfg = config(model_dir, data, tmp_path / "out", stage=2, epochs=6, lr=3e-3, pack=True, batch_size=1)
    train.main(cfg)
    curve = losses(tmp_path / "out")
    print("loss curve:", [round(x, 3) for x in curve])
    assert np.mean(curve[-3:]) < 0.5 * np.mean(curve[:3])


def test_activation_checkpointing_and_compile_keep_the_losses(model_dir, tmp_path):
    """selective (matmuls and attention saved, the rest recomputed) and full checkpointing recompute the same
    numbers: losses and final weights equal to none's; torch.compile of each block (inductor on CPU) fuses ops,
    which moves fp32 results by rounding only."""
    data = write_dataset(tmp_path / "d", 4)
    runs = {}
    for name, kw in {"none": {}, "selective": {}, "full": {}, "compiled": dict(compile=True)}.items():
        ac = name if name != "compiled" else "none"
        cfg = config(model_dir, data, tmp_path / name, stage=2, max_steps=2, activation_checkpointing=ac, **kw)
        train.main(cfg)
        runs[name] = losses(tmp_path / name), load_file(tmp_path / name / "model.safetensors")
    base_losses, base_w = runs["none"]
    for name in ("selective", "full"):
        got_losses, got_w = runs[name]
        assert got_losses == base_losses and all(torch.equal(got_w[k], base_w[k]) for k in base_w), name
    assert max(abs(x - y) for x, y in zip(runs["compiled"][0], base_losses)) <= 1e-4


def test_out_holding_a_model_is_refused_unless_forced(model_dir, tmp_path):
    data = write_dataset(tmp_path / "d", 2)
    out = tmp_path / "out"
    shutil.copytree(model_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cfg = config(model_dir, data, out, max_steps=1)
    with pytest.raises(SystemExit, match=r"already holds a model \(config.json and weights\): choose a new --out, "
                                         r"--resume to continue .* or --force to clear it first"):
        train.main(cfg)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"other already holds 1 file\(s\) \(notes.txt\)"):
        train.main(dataclasses.replace(cfg, out=str(tmp_path / "other"), resume=True))  # no checkpoints: not its run
    train.main(dataclasses.replace(cfg, force=True))
    assert not (out / "assemble.json").exists() and len(losses(out)) == 1


def test_resume_without_a_checkpoint_starts_fresh_and_the_log_keeps_each_step_once(model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path / "d", 4)
    cfg = config(model_dir, data, tmp_path / "out", stage=1, max_steps=4, save_every=2, resume=True)
    train.main(cfg)
    assert "no complete checkpoint under" in capsys.readouterr().out and len(losses(tmp_path / "out")) == 4
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step_00000002"]
    first = losses(tmp_path / "out")
    train.main(cfg)  # resumes at step 2: steps 3 and 4 are replayed, and their old log lines dropped
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and losses(tmp_path / "out") == first


@pytest.mark.parametrize("argv, message", [
    (["--stage", "3"], "argument --stage: invalid choice: 3 (choose from 1, 2)"),
    (["--max-steps", "-1"], "--max-steps -1: must be 0 or more"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--lr", "0"], "--lr 0.0: must be above 0"),
    (["--activation-checkpointing", "some"], "invalid choice: 'some'"),
    (["--model", "/nonexistent/model"], "/nonexistent/model does not exist"),
])
def test_flags_are_checked_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_help_is_fast_and_shows_every_flag_with_help_and_default():
    # -X importtime lists every module imported: parsing happens before torch is, so --help never imports it
    r = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "| cli" in r.stderr and not re.search(r"\| +torch$", r.stderr, re.M)
    helps, _ = comments(train.TrainConfig)
    for f in dataclasses.fields(train.TrainConfig):
        assert "--" + f.name.replace("_", "-") in r.stdout and helps[f.name], f.name  # every flag has a help line
    text = " ".join(r.stdout.split())  # argparse wraps lines at the terminal's width
    assert "AdamW, betas 0.9 / 0.95) (default: 0.0001)" in text and "memory and speed:" in r.stdout
    assert "  --save-every SAVE_EVERY\n" in r.stdout and "steps per checkpoint" in r.stdout


def test_lora_stage2_fsdp_resume_and_the_adapter_files(model_dir, tmp_path):
    """LoRA on the LLM, the merger trained in full, vision frozen: 2 ranks == 1 process, resumed == uninterrupted,
    only the adapters and the merger change, and --out holds the base beside a PEFT adapter that
    weights.load(--adapter) merges."""
    data = write_dataset(tmp_path / "d", 8)
    kw = dict(stage=2, max_steps=4, train_vision=False, lora_rank=4, lora_alpha=8, lr=1e-2)
    one = config(model_dir, data, tmp_path / "one", grad_accum=2, save_every=2, keep_last=0, **kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(one)
        part = tmp_path / "part"  # resume from the step-2 checkpoint of the same run
        shutil.copytree(tmp_path / "one" / "checkpoints" / "step_00000002", part / "checkpoints" / "step_00000002")
        train.main(dataclasses.replace(one, out=str(part), resume=True))
    finally:
        torch.set_num_threads(threads)
    torchrun(config(model_dir, data, tmp_path / "two", grad_accum=1, **kw), 2)
    a = losses(tmp_path / "one")
    assert a == losses(tmp_path / "two") and losses(part) == a[2:] and a[0] != a[-1]
    before, after = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("merger" in k for k in changed), changed  # the LLM's own weights bitwise unchanged
    adapter = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2 and all(k.startswith("base_model.model.model.language_model.layers.") for k in adapter)
    assert all(torch.equal(adapter[k], load_file(tmp_path / "two" / "adapter_model.safetensors")[k]) for k in adapter)
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["r"] == 4
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    merged, _, _ = weights.load(tmp_path / "one", dtype=torch.float32, adapter=str(tmp_path / "one"))
    base, _, _ = weights.load(tmp_path / "one", dtype=torch.float32)
    with torch.no_grad():
        assert (merged(ids) - base(ids)).abs().max() > 1e-4  # the adapter does something
    with pytest.raises(SystemExit, match="holds a LoRA adapter beside its weights: merge it first"):
        train.main(config(tmp_path / "one", data, tmp_path / "three", stage=2, max_steps=1))


# ---- checkpoints: pickle-free, checksummed, resumed only where they can be continued exactly ----


class Payload:
    """Unpickling this runs code: it touches a marker file."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoints_load_no_pickle_and_damage_falls_back(model_dir, tmp_path, capsys):
    import pickle
    data = write_dataset(tmp_path / "d", 8)
    full = config(model_dir, data, tmp_path / "full", stage=2, max_steps=6, save_every=2, keep_last=0)
    train.main(full)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints", part / "checkpoints")
    shutil.rmtree(part / "checkpoints" / "step_00000006", ignore_errors=True)
    marker = tmp_path / "executed"
    for ckpt in (part / "checkpoints").iterdir():  # a pickle payload beside every file, under every old name
        for name in ("rank_0.pt", ".metadata", "__0_0.distcp", "optimizer.pt", "rng_state.pth"):
            (ckpt / name).write_bytes(pickle.dumps(Payload(marker)))
    newest = part / "checkpoints" / "step_00000004" / "rank_0.safetensors"
    raw = bytearray(newest.read_bytes())
    raw[-64:-48] = bytes(16)  # 16 zeroed bytes inside a tensor: only the checksum can tell
    newest.write_bytes(raw)
    train.main(dataclasses.replace(full, out=str(part), resume=True))
    out = capsys.readouterr().out
    assert "skipping step_00000004: " in out and "rank_0.safetensors is missing or damaged" in out
    assert "resumed from" in out and "step_00000002 at step 2" in out
    assert losses(part) == losses(tmp_path / "full")[2:] and not marker.exists()
    w1, w2 = load_file(tmp_path / "full" / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_resume_refuses_each_changed_data_setting_by_name(model_dir, tmp_path):
    data = write_dataset(tmp_path / "d", 4)
    cfg = config(model_dir, data, tmp_path / "out", stage=1, max_steps=3, save_every=2)
    train.main(cfg)
    for change, said in [(dict(grad_accum=2), "--grad-accum 1, this run has 2"),
                         (dict(batch_size=2), "--batch-size 1, this run has 2"),
                         (dict(max_length=64), "--max-length 128, this run has 64"),
                         (dict(pack=True), "--pack False, this run has True"),
                         (dict(seed=1), "--seed 0, this run has 1"),
                         (dict(stage=2), "--stage 1, this run has 2"),
                         (dict(lora_rank=4), "--lora-rank 0, this run has 4")]:
        with pytest.raises(SystemExit, match=rf"step_00000002 was written with {said}: the data order \(or the "
                                             r"parameters\) would differ"):
            train.main(dataclasses.replace(cfg, resume=True, **change))
    two = tmp_path / "two"  # another world size: the shards and per-rank data offsets would not fit
    shutil.copytree(tmp_path / "out" / "checkpoints", two / "checkpoints")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29600 + os.getpid() % 1000), str(ROOT / "train.py"),
                        *cli(dataclasses.replace(cfg, out=str(two), resume=True))],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "was written by 1 processes, this run has 2" in r.stderr, r.stderr[-2000:]


def test_no_runtime_file_unpickles():
    for f in ROOT.glob("*.py"):
        text = f.read_text()
        assert "torch.load(" not in text and "import pickle" not in text and "weights_only=False" not in text, f


def test_non_finite_loss_stops_at_its_step_and_saves_nothing(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    state = load_file(broken / "model.safetensors")
    name = next(k for k in state if "merger" in k and k.endswith("weight") and state[k].dim() == 2)
    state[name][0, 0] = float("nan")
    from safetensors.torch import save_file
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    data = write_dataset(tmp_path / "d", 4)
    cfg = config(broken, data, tmp_path / "out", stage=1, max_steps=3)
    with pytest.raises(SystemExit, match=r"step 1: loss nan, gradient norm nan.*stopped, nothing saved"):
        train.main(cfg)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_second_run_on_a_locked_out_is_refused(model_dir, tmp_path):
    data = write_dataset(tmp_path / "d", 2)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)  # another run's rank 0
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=r"another run is training into .*out \(it holds .*\.lock\)"):
            train.main(config(model_dir, data, out, max_steps=1))
    finally:
        holder.kill()
        holder.wait()
    train.main(config(model_dir, data, out, max_steps=1))  # once it is gone, the lock is free
    assert len(losses(out)) == 1


def test_log_has_tokens_per_s_and_the_vlm_flop_counters_mfu(model_dir, tmp_path):
    import flops
    data = write_dataset(tmp_path / "d", 2)
    train.main(config(model_dir, data, tmp_path / "out", stage=1, max_steps=1, peak_tflops=1.0))
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12 and flops.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12


def test_lora_under_activation_checkpointing_gives_the_same_losses(model_dir, tmp_path):
    data = write_dataset(tmp_path / "d", 4)
    kw = dict(stage=2, max_steps=2, train_vision=False, lora_rank=4, lora_alpha=8, lr=1e-2)
    runs = {}
    for ac in ("none", "selective", "full"):
        train.main(config(model_dir, data, tmp_path / ac, activation_checkpointing=ac, **kw))
        runs[ac] = losses(tmp_path / ac), load_file(tmp_path / ac / "adapter_model.safetensors")
    for ac in ("selective", "full"):
        assert runs[ac][0] == runs["none"][0] and all(torch.equal(v, runs["none"][1][k]) for k, v in runs[ac][1].items())
