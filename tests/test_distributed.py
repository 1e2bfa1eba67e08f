"""Several training processes (gloo on the CPU, 2 processes on localhost).

One torch.multiprocessing spawn runs the 2-process trainings of the module (they share
one process group), torchrun runs one more through the CLI, and the 1-process runs
happen in the test process. Same global batch and seed: the weights must agree.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY, random_images, tiny_config, write_images, write_preset
from safetensors.torch import load_file, save_file

from diffusekit import distributed
from diffusekit.diffusion_training import DiffusionRecipe, train
from diffusekit.errors import DiffusekitWarning, UserError
from diffusekit.files import read_tensors
from diffusekit.io.checkpoint import latest_checkpoint
from diffusekit.trainer import Trainer

STEPS = 4  # checkpoints at STEPS / 2 and STEPS
ONE = {"train__batch_size": 8, "train__grad_accumulation": 1}  # 1 process: global batch 8
TWO = {"train__batch_size": 2, "train__grad_accumulation": 2}  # 2 processes x 2 x 2: global batch 8, with no_sync
# flips and label-free data: flips, t and noise all come from the generator the ranks share
COMMON = {"data__hflip": True, "train__max_steps": STEPS, "train__checkpoint_every": STEPS // 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_of(trainer) -> dict[str, torch.Tensor]:
    modules = {"net": trainer.net, "ema": trainer.ema}
    return {f"{name}.{k}": v.contiguous() for name, module in modules.items() for k, v in module.state_dict().items()}


def _poison_step_2_on_rank_1(monkeypatch_target):
    """Make diffusion_loss NaN in step 2 on rank 1 only (its 3rd call: 2 micro-batches a step); every rank must skip that step."""
    import diffusekit.diffusion_training as train_module

    real, calls = train_module.diffusion_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if distributed.rank() == 1 and len(calls) == 3 else loss

    monkeypatch_target.diffusion_loss = poisoned
    return real


def _worker(rank: int, world: int, port: int, out: Path, jobs: list[tuple[str, str, dict, bool, bool]]) -> None:
    """One rank of the spawned runs. Rank 1 gets a run folder of its own, which must stay empty."""
    import diffusekit.diffusion_training as train_module

    os.environ.update(distributed.one_machine_env(rank, world, port))
    torch.set_num_threads(1)
    with distributed.process_group("cpu"):
        for label, run, sets, resume, poison in jobs:
            run_dir = out / run if rank == 0 else out / f"{run}-rank{rank}"
            real = _poison_step_2_on_rank_1(train_module) if poison else train_module.diffusion_loss
            try:
                trainer = Trainer(tiny_config(**sets), run_dir, DiffusionRecipe, progress=False)
                result = trainer.run(resume_from=latest_checkpoint(out / run) if resume else None)
            finally:
                train_module.diffusion_loss = real
            save_file(state_of(trainer), out / f"{label}.rank{rank}.safetensors")
            (out / f"{label}.rank{rank}.json").write_text(json.dumps({"step": result.step, "skipped": result.skipped_steps}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The runs every test here compares: 1 process in this one, 2 processes spawned."""
    out = tmp_path_factory.mktemp("ddp")
    write_images(out / "images", random_images(16, seed=3))
    data = {"data__path": str(out / "images")}
    train(tiny_config(**data, **COMMON, **ONE), out / "one", progress=False)
    two = {**data, **COMMON, **TWO}
    jobs = [
        ("two", "two", two, False, False),
        ("split", "split", {**two, "train__max_steps": STEPS // 2}, False, False),
        ("resumed", "split", two, True, False),
        ("nan", "nan", {**two, "train__on_nan": "skip"}, False, True),
    ]
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), out, jobs), nprocs=2, join=True)
    return out


def weights(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run) if step is None else run / "checkpoints" / f"step_{step:08d}"
    return {f"{group}.{k}": v for group in ("model", "ema", "optimizer") for k, v in read_tensors(ckpt / f"{group}.safetensors").items()}


def assert_close(a: dict, b: dict, exact: bool = False):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:  # float rounding (another summation order), which Adam's first steps amplify to up to lr
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-4, msg=key)  # for gradients near 0; lr = 1e-3


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_as_one_with_the_same_global_batch(runs):
    assert_close(weights(runs / "two"), weights(runs / "one"))
    assert losses(runs / "two") == pytest.approx(losses(runs / "one"), rel=1e-4)  # rank 0 logs the mean over the ranks
    state = json.loads((latest_checkpoint(runs / "two") / "state.json").read_text())
    assert state["images_seen"] == STEPS * 8 and state["processes"] == 2 and state["global_batch"] == 8


def test_every_rank_keeps_the_same_weights_and_ema(runs):
    for label in ("two", "resumed", "nan"):
        assert_close(load_file(runs / f"{label}.rank0.safetensors"), load_file(runs / f"{label}.rank1.safetensors"), exact=True)


def test_only_rank_0_writes(runs):
    assert not any(runs.glob("*-rank1"))
    assert [json.loads(line)["step"] for line in (runs / "two" / "metrics.jsonl").read_text().splitlines()] == list(range(1, STEPS + 1))


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(runs):
    assert_close(weights(runs / "split"), weights(runs / "two"), exact=True)
    assert losses(runs / "split") == losses(runs / "two")


def test_a_two_process_checkpoint_resumes_with_one_process(runs, tmp_path):
    run = tmp_path / "mixed"
    shutil.copytree(runs / "two", run)
    (run / "checkpoints" / "latest").write_text(f"step_{STEPS // 2:08d}\n")  # resume from the middle
    config = tiny_config(data__path=str(runs / "images"), **COMMON, **ONE)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        result = train(config, run, resume=True, progress=False)
    assert result.step == STEPS
    assert_close(weights(run), weights(runs / "one"))  # the same global data order, t and noise
    assert not any("global batch" in str(w.message) for w in warned)  # 1 x 8 x 1 = 2 x 2 x 2

    halved = tiny_config(data__path=str(runs / "images"), **COMMON, train__batch_size=2, train__grad_accumulation=2)
    (run / "checkpoints" / "latest").write_text(f"step_{STEPS // 2:08d}\n")
    with pytest.warns(DiffusekitWarning, match="the global batch is now 4 images"):
        train(halved, run, resume=True, progress=False)


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(runs):
    for rank in (0, 1):
        assert json.loads((runs / f"nan.rank{rank}.json").read_text()) == {"step": STEPS, "skipped": 1}
    records = [json.loads(line) for line in (runs / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert "loss" not in records[1] and records[1]["skipped_steps"] == 1


def test_torchrun_runs_the_cli(runs, tmp_path):
    preset = {section: dict(keys) for section, keys in TINY.items()}
    preset["data"]["path"] = str(runs / "images")
    preset["data"]["hflip"] = True
    preset["train"].update(batch_size=2, grad_accumulation=2, max_steps=STEPS, checkpoint_every=STEPS // 2)
    write_preset(tmp_path / "tiny.toml", preset)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "diffusekit", "train", "--preset", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "run"), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run: ") == 1  # printed by rank 0 only
    assert_close(weights(tmp_path / "run"), weights(runs / "two"), exact=True)  # the CLI under torchrun = the spawned run


def test_autoencoder_training_refuses_several_processes(monkeypatch, image_folder, tmp_path):
    from diffusekit.autoencoder_training import AutoencoderRecipe

    monkeypatch.setattr(distributed, "world", lambda: 2)
    with pytest.raises(UserError, match="train-vae.*one process only.*without torchrun"):
        Trainer(tiny_config(data__path=str(image_folder), task="autoencoder"), tmp_path / "vae", AutoencoderRecipe, progress=False)
