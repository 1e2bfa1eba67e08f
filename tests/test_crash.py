"""Training that survives being killed, a full disk and a NaN loss.

The kills are real: `python -m diffusekit train` in a subprocess, SIGKILLed mid-run or
mid-save; the resume then runs the CLI in this process and must end with the same
weights as a run that was never interrupted.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_config, write_preset

import diffusekit.files as files_module
import diffusekit.train as train_module
from diffusekit.cli import main
from diffusekit.errors import DiffusekitWarning, UserError
from diffusekit.files import read_tensors
from diffusekit.io.checkpoint import latest_checkpoint
from diffusekit.train import train

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
