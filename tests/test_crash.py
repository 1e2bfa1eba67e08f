"""Training that survives being killed, a full disk, a NaN loss and a damaged checkpoint.

The kills are real: `python -m diffusekit train` in a subprocess, SIGKILLed mid-run or
mid-save; the resume then runs the CLI in this process and must end with the same
weights as a run that was never interrupted.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_user_error, cli, tiny_config, write_preset

import diffusekit.diffusion_training as train_module
import diffusekit.files as files_module
from diffusekit.cli import main
from diffusekit.diffusion_training import train
from diffusekit.errors import DiffusekitWarning, UserError
from diffusekit.files import read_tensors
from diffusekit.io.checkpoint import latest_checkpoint
from diffusekit.pipeline import Pipeline

EVERY = 3  # checkpoint_every in the killed runs


@pytest.fixture
def preset(image_folder, tmp_path) -> Path:
    values = {section: dict(keys) for section, keys in TINY.items()}
    values["data"]["path"] = str(image_folder)
    values["train"]["checkpoint_every"] = EVERY
    return write_preset(tmp_path / "tiny.toml", values)


def start_training(preset: Path, run: Path, code: str = "") -> subprocess.Popen:
    """`python -m diffusekit train` of the tiny preset for (almost) ever, after running `code` (a test hook) in that process."""
    args = ["train", "--preset", str(preset), "--out", str(run), "--steps", "100000", "--quiet"]
    script = f"import sys\n{code}\nfrom diffusekit.cli import main\nsys.exit(main({args!r}))\n"
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.05)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()


def metrics_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")] if path.is_file() else []  # not a cut line


def resume_to(preset: Path, run: Path, steps: int) -> None:
    assert main(["train", "--preset", str(preset), "--out", str(run), "--resume", "--steps", str(steps), "--quiet"]) == 0


def assert_same_run_as_uninterrupted(run: Path, image_folder: Path, steps: int, tmp_path: Path) -> None:
    straight = train(tiny_config(data__path=str(image_folder), train__checkpoint_every=EVERY, train__max_steps=steps), tmp_path / "straight", progress=False)
    for group in ("model", "ema", "optimizer"):
        a, b = (read_tensors(ckpt / f"{group}.safetensors") for ckpt in (latest_checkpoint(run), straight.checkpoint))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group
    assert metrics_steps(run) == list(range(1, steps + 1))  # lines past the checkpoint (redone) and a cut line are dropped
    assert [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(line)["loss"] for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- kill -9


def test_kill_9_mid_run_then_resume_continues_exactly(preset, image_folder, tmp_path):
    run = tmp_path / "run"
    process = start_training(preset, run)
    wait_for(lambda: latest_checkpoint(run) is not None and max(metrics_steps(run), default=0) >= EVERY + 2, process)
    kill(process)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # as a kill in the middle of a write would leave it
    saved = json.loads((latest_checkpoint(run) / "state.json").read_text())["step"]
    assert saved % EVERY == 0
    resume_to(preset, run, saved + 2)
    assert_same_run_as_uninterrupted(run, image_folder, saved + 2, tmp_path)


SLOW_SECOND_SAVE = f"""
import pathlib, time
import diffusekit.files as f
real = f.save_file
def save_file(tensors, path, **options):
    real(tensors, path, **options)
    path = pathlib.Path(path)  # files are written as .NAME.*.tmp.safetensors, then renamed
    if "step_{2 * EVERY:08d}" in str(path) and path.name.startswith(".ema.safetensors."):  # mid-way through the second save
        pathlib.Path(str(path.parent.parent.parent / "saving")).touch()
        time.sleep(600)
f.save_file = save_file
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_latest(preset, image_folder, tmp_path):
    run = tmp_path / "run"
    process = start_training(preset, run, SLOW_SECOND_SAVE)
    wait_for((run / "saving").exists, process)
    kill(process)
    folder = run / "checkpoints"
    leftovers = list(folder.glob(".tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()  # the half-written checkpoint
    assert latest_checkpoint(run) == folder / f"step_{EVERY:08d}"
    (folder / f"step_{2 * EVERY:08d}").mkdir()  # and an incomplete folder of that step, as if a rename had been cut short
    (folder / f"step_{2 * EVERY:08d}" / "model.safetensors").write_bytes(b"")
    resume_to(preset, run, 2 * EVERY)
    assert not list(folder.glob(".tmp-*")) and not list(folder.glob(".latest.*"))
    assert latest_checkpoint(run) == folder / f"step_{2 * EVERY:08d}"
    assert_same_run_as_uninterrupted(run, image_folder, 2 * EVERY, tmp_path)


# ----------------------------------------------------------------------------- failed saves


def disk_full_at(monkeypatch, *steps: int) -> None:
    """Saving the checkpoints of `steps` fails with ENOSPC after the first file."""
    real = files_module.save_file

    def save_file(tensors, path, **options):
        final = Path(path).name.lstrip(".").split(".safetensors")[0] + ".safetensors"  # written as .NAME.*.tmp.safetensors
        if any(f"step_{step:08d}" in str(path) for step in steps) and final != "model.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(tensors, path, **options)

    monkeypatch.setattr(files_module, "save_file", save_file)


def test_a_failed_save_keeps_the_previous_checkpoint_and_training_goes_on(monkeypatch, image_folder, tmp_path, capsys):
    disk_full_at(monkeypatch, 4)
    with pytest.warns(DiffusekitWarning) as warned:
        result = train(tiny_config(data__path=str(image_folder), train__max_steps=6, train__checkpoint_every=2), tmp_path / "run", progress=False)
    err = "\n".join(f"warning: {w.message}" for w in warned)
    assert "warning: could not write a checkpoint: step 4" in err and "No space left on device" in err
    assert "step_00000002, is kept; training goes on" in err
    assert result.step == 6 and result.checkpoint.name == "step_00000006"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000006"]


def test_a_failed_final_save_is_an_error_and_keeps_the_previous_checkpoint(monkeypatch, preset, tmp_path, capsys):
    disk_full_at(monkeypatch, 4)
    run = tmp_path / "run"
    assert main(["train", "--preset", str(preset), "--out", str(run), "--steps", "4", "--quiet", "--set", "train.checkpoint_every=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: could not write the final checkpoint: step 4") and "No space left on device" in err
    assert "step_00000002, is kept" in err and "--resume" in err
    assert latest_checkpoint(run) == run / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]


# ----------------------------------------------------------------------------- NaN


def nan_at(monkeypatch, step: int) -> None:
    """The loss is NaN in the `step`-th train_step from now on (one micro-batch a step)."""
    calls = []

    def loss(*args, real=train_module.diffusion_loss, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) == step else value

    monkeypatch.setattr(train_module, "diffusion_loss", loss)


def test_a_nan_loss_stops_the_run_and_keeps_the_checkpoint(monkeypatch, image_folder, tmp_path):
    nan_at(monkeypatch, 3)
    config = tiny_config(data__path=str(image_folder), train__max_steps=5, train__checkpoint_every=2)
    with pytest.raises(UserError, match=r"NaN or infinite at step 3.*lower train\.lr \(now 0\.001\).*train\.on_nan=skip"):
        train(config, tmp_path / "run", progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_00000002" and all(torch.isfinite(v).all() for v in read_tensors(ckpt / "model.safetensors").values())

    nan_at(monkeypatch, 1)  # the fix the message offers: resume, skipping the batch that broke
    resumed = train(tiny_config(data__path=str(image_folder), train__max_steps=5, train__checkpoint_every=2, train__on_nan="skip"),
                    tmp_path / "run", resume=True, progress=False)
    assert resumed.step == 5 and resumed.skipped_steps == 1


def test_skip_leaves_out_the_bad_batch_and_counts_it(monkeypatch, image_folder, tmp_path, capsys):
    nan_at(monkeypatch, 3)
    config = tiny_config(data__path=str(image_folder), train__max_steps=4, train__checkpoint_every=1, train__keep_checkpoints=10, train__on_nan="skip")
    with pytest.warns(DiffusekitWarning, match="NaN or infinite at step 3; that batch is skipped"):
        result = train(config, tmp_path / "run", progress=False)
    assert result.step == 4 and result.skipped_steps == 1 and math.isfinite(result.last_loss)
    folder = tmp_path / "run" / "checkpoints"
    for group in ("model", "ema", "optimizer"):  # step 3: no optimizer step, no EMA update
        before, skipped = (read_tensors(folder / f"step_{s:08d}" / f"{group}.safetensors") for s in (2, 3))
        assert all(torch.equal(before[k], skipped[k]) for k in before), group
    after, skipped = (read_tensors(folder / f"step_{s:08d}" / "model.safetensors") for s in (4, 3))
    assert not torch.equal(after["conv_in.weight"], skipped["conv_in.weight"])  # and then training goes on
    assert json.loads((folder / "step_00000004" / "state.json").read_text())["skipped_steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in records] == [0, 0, 1, 1] and "loss" not in records[2]
    err = capsys.readouterr().err
    assert "1 batch(es) skipped" in err


def test_on_nan_takes_stop_or_skip():
    with pytest.raises(UserError, match="train.on_nan = 'ignore' is not one of: stop, skip"):
        tiny_config(train__on_nan="ignore")


# ----------------------------------------------------------------------------- damaged checkpoints


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as a disk error or a copy cut short leaves it


def train_to(preset: Path, run: Path, steps: int) -> Path:
    """The tiny preset trained to `steps`, keeping its checkpoints at EVERY, 2 EVERY ...; the checkpoints folder."""
    assert main(["train", "--preset", str(preset), "--out", str(run), "--steps", str(steps), "--quiet", "--set", "train.keep_checkpoints=10"]) == 0
    return run / "checkpoints"


def warning_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def test_a_damaged_newest_checkpoint_is_passed_over_and_kept(preset, image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    folder = train_to(preset, run, 2 * EVERY)
    damaged = folder / f"step_{2 * EVERY:08d}"
    cut_in_half(damaged / "optimizer.safetensors")
    cut = (damaged / "optimizer.safetensors").read_bytes()
    capsys.readouterr()
    resume_to(preset, run, 2 * EVERY - 1)  # continues from step EVERY, the newest intact one
    [warned] = warning_lines(capsys)
    assert f"'{damaged / 'optimizer.safetensors'}' is damaged" in warned
    assert f"using the newest intact checkpoint, step_{EVERY:08d}, instead" in warned
    assert (damaged / "optimizer.safetensors").read_bytes() == cut  # left as it was

    resume_to(preset, run, 2 * EVERY + 2)  # the run reaches the damaged one's step: it is renamed, not lost
    [moved] = warning_lines(capsys)
    assert f"kept as step_{2 * EVERY:08d}.damaged, and step_{2 * EVERY:08d} is written anew" in moved
    assert (folder / f"step_{2 * EVERY:08d}.damaged" / "optimizer.safetensors").read_bytes() == cut
    assert_same_run_as_uninterrupted(run, image_folder, 2 * EVERY + 2, tmp_path)  # the fallback resumed bit for bit
    assert warning_lines(capsys) == []  # now every checkpoint the run uses is intact


@pytest.mark.parametrize("pointer", [None, b"\xff\xfe\x00", b"step_00000099\n", b"../../elsewhere\n"])
def test_without_a_usable_latest_file_resume_finds_the_newest_intact_checkpoint(preset, image_folder, tmp_path, capsys, pointer):
    run = tmp_path / "run"
    folder = train_to(preset, run, 2 * EVERY)
    if pointer is None:
        (folder / "latest").unlink()  # as a kill between a checkpoint's rename and its pointer leaves it
    else:
        (folder / "latest").write_bytes(pointer)
    capsys.readouterr()
    before = (run / "metrics.jsonl").read_text()
    resume_to(preset, run, 2 * EVERY + 1)
    assert (run / "metrics.jsonl").read_text().startswith(before)  # continued from step 2 EVERY: no step redone (elapsed_s would differ)
    warned = warning_lines(capsys)
    assert_same_run_as_uninterrupted(run, image_folder, 2 * EVERY + 1, tmp_path)
    if pointer is None:
        assert warned == []
    else:
        assert len(warned) == 1 and f"latest' names no complete checkpoint; using the newest intact checkpoint, step_{2 * EVERY:08d}" in warned[0]


def test_sampling_a_run_with_a_damaged_newest_checkpoint_uses_the_newest_intact_one(preset, tmp_path, capsys):
    folder = train_to(preset, tmp_path / "run", 2 * EVERY)
    cut_in_half(folder / f"step_{2 * EVERY:08d}" / "ema.safetensors")
    copy = tmp_path / "copy"  # the warning is given once per process and run
    shutil.copytree(tmp_path / "run", copy)
    capsys.readouterr()
    code, _, err = cli(capsys, "sample", tmp_path / "run", "--n", "1", "--steps", "2", "--out", tmp_path / "x.png")
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and (tmp_path / "x.png").is_file()
    assert len(warned) == 1 and f"step_{2 * EVERY:08d}/ema.safetensors' is damaged" in warned[0] and f"step_{EVERY:08d}, instead" in warned[0]
    with pytest.warns(DiffusekitWarning, match=f"step_{2 * EVERY:08d}/ema.safetensors' is damaged.*newest intact checkpoint, step_{EVERY:08d}"):
        pipe = Pipeline.from_pretrained(copy)
    assert pipe.checkpoint == copy / "checkpoints" / f"step_{EVERY:08d}" and pipe.step == EVERY

    cut_in_half(copy / "checkpoints" / f"step_{EVERY:08d}" / "config.json")  # no intact checkpoint at all: one error naming the damage
    assert_user_error(cli(capsys, "sample", copy, "--n", "1", "--steps", "2", "--out", tmp_path / "y.png"),
                      f"no checkpoint of the run '{copy}' is intact", f"step_{2 * EVERY:08d}/ema.safetensors' is damaged", f"step_{EVERY:08d}/config.json")
    assert not (tmp_path / "y.png").exists()


def test_an_output_kept_beside_the_checkpoints_that_cannot_be_written_warns_and_is_an_error_only_at_the_end(tmp_path):
    """A LoRA file or ControlNet folder a recipe rewrites with each checkpoint (training_state.save_output), on a full disk."""
    from diffusekit.training_state import save_output

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.warns(DiffusekitWarning, match=r"could not write the LoRA file .*No space left.*training goes on"):
        save_output("the LoRA file", tmp_path / "lora.safetensors", full_disk, final=False)
    with pytest.raises(UserError, match=r"could not write the ControlNet folder .*--resume writes it from the last checkpoint"):
        save_output("the ControlNet folder", tmp_path / "controlnet", full_disk, final=True)
    written = []
    save_output("the LoRA file", tmp_path / "lora.safetensors", lambda: written.append(1), final=True)
    assert written == [1]
