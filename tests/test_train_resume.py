"""The training loop: checkpoints that load back exactly, a bit-exact resume, atomic saves,
metrics, the time budget, gradient accumulation and the optimizer pieces."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_user_error, cli, tiny_config, write_preset

import diffusekit.trainer as trainer_module
from diffusekit.config import apply_overrides, config_to_dict
from diffusekit.diffusion_training import DiffusionRecipe, train
from diffusekit.errors import ConfigError, DiffusekitWarning, UserError
from diffusekit.files import read_tensors
from diffusekit.io.checkpoint import latest_checkpoint
from diffusekit.optim import ema_decay_at, ema_update, lr_at
from diffusekit.pipeline import Pipeline
from diffusekit.trainer import Trainer

CHECKPOINT_FILES = {"config.json", "state.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors"}


@pytest.fixture
def run_config(image_folder):
    """tiny_config on the 16-image folder; keyword overrides as in tiny_config."""
    return lambda **sets: tiny_config(data__path=str(image_folder), **sets)


def checkpoint_tensors(ckpt) -> dict[str, dict[str, torch.Tensor]]:
    return {name: read_tensors(ckpt / f"{name}.safetensors") for name in ("model", "ema", "optimizer")}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- save and load


def test_checkpoint_holds_the_trained_weights(run_config, tmp_path):
    trainer = Trainer(run_config(train__max_steps=2), tmp_path / "run", DiffusionRecipe, progress=False)
    result = trainer.run()
    assert result.step == 2 and result.stopped_by == "max_steps"
    assert {p.name for p in result.checkpoint.iterdir()} == CHECKPOINT_FILES
    saved = checkpoint_tensors(result.checkpoint)
    assert_same_tensors(saved["model"], trainer.net.state_dict())
    assert_same_tensors(saved["ema"], trainer.ema.state_dict())
    assert not torch.equal(saved["model"]["conv_in.weight"], saved["ema"]["conv_in.weight"])


def test_pipeline_loads_from_the_run_and_the_checkpoint_folder(trained_run):
    ckpt = latest_checkpoint(trained_run)
    from_run, from_ckpt = Pipeline.from_pretrained(trained_run, device="cpu"), Pipeline.from_pretrained(ckpt, device="cpu")
    raw = Pipeline.from_pretrained(ckpt, weights="model", device="cpu")
    assert from_run.step == from_ckpt.step == 2 and from_run.checkpoint == ckpt
    assert_same_tensors(from_run.net.state_dict(), read_tensors(ckpt / "ema.safetensors"))
    assert_same_tensors(raw.net.state_dict(), read_tensors(ckpt / "model.safetensors"))
    torch.testing.assert_close(from_run.sample(2, steps=3), from_ckpt.sample(2, steps=3), rtol=0, atol=0)


def test_pipeline_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(UserError, match="neither a run folder"):
        Pipeline.from_pretrained(tmp_path)


def test_weights_of_another_shape_are_a_user_error(trained_run, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(latest_checkpoint(trained_run), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["channels"] = [8, 24]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="do not fit this model's config.*shape mismatch"):
        Pipeline.from_pretrained(ckpt)


# ----------------------------------------------------------------------------- resume


def test_resume_is_bit_exact(run_config, tmp_path):
    # dropout (global RNG), flips (the training generator), warm-up and a cosine lr (the step)
    # all depend on state that a resume must restore
    sets = {"model__dropout": 0.1, "data__hflip": True, "train__lr_schedule": "cosine", "train__warmup_steps": 2}
    straight = train(run_config(train__max_steps=6, **sets), tmp_path / "straight", progress=False)
    train(run_config(train__max_steps=3, **sets), tmp_path / "split", progress=False)
    resumed = train(run_config(train__max_steps=6, **sets), tmp_path / "split", resume=True, progress=False)
    assert resumed.step == straight.step == 6
    a, b = checkpoint_tensors(straight.checkpoint), checkpoint_tensors(resumed.checkpoint)
    for group in a:
        assert_same_tensors(a[group], b[group])
    state_a, state_b = (json.loads((r.checkpoint / "state.json").read_text()) for r in (straight, resumed))
    assert state_a["data"] == state_b["data"] and state_a["images_seen"] == state_b["images_seen"] == 48
    losses = [[json.loads(line)["loss"] for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for r in (straight, resumed)]
    assert losses[0] == losses[1]


def test_resume_needs_a_checkpoint(run_config, tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        train(run_config(), tmp_path / "empty", resume=True, progress=False)


def test_resume_refuses_another_config(run_config, trained_run):
    before = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    with pytest.raises(UserError, match=r"model\.channels: \[8, 16\] in the run, \[8, 8\] asked"):
        train(run_config(model__channels=[8, 8]), trained_run, resume=True, progress=False)
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == before


# ----------------------------------------------------------------------------- checkpoints by wall time


def fake_clock(monkeypatch, seconds_per_step: float) -> None:
    """The clock of train.checkpoint_minutes moves `seconds_per_step` with each training step: no real waiting."""
    now = [0.0]

    def train_step(self, real=Trainer.train_step):
        now[0] += seconds_per_step
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(trainer_module, "wall_clock", lambda: now[0])


def checkpoint_names(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_a_checkpoint_at_least_every_checkpoint_minutes(monkeypatch, run_config, tmp_path):
    fake_clock(monkeypatch, 40)  # at 1 minute, every second step is due
    timed = train(run_config(train__max_steps=5, train__checkpoint_minutes=1, train__keep_checkpoints=10), tmp_path / "timed", progress=False)
    assert checkpoint_names(timed.run_dir) == ["latest", "step_00000002", "step_00000004", "step_00000005"]
    off = train(run_config(train__max_steps=5, train__checkpoint_minutes=0, train__keep_checkpoints=10), tmp_path / "off", progress=False)
    assert checkpoint_names(off.run_dir) == ["latest", "step_00000005"]  # 0: by train.checkpoint_every alone
    a, b = checkpoint_tensors(timed.checkpoint), checkpoint_tensors(off.checkpoint)
    for group in a:  # saving changes nothing in the run
        assert_same_tensors(a[group], b[group])


def test_a_timed_checkpoint_resumes_bit_exact(monkeypatch, run_config, tmp_path):
    import shutil

    fake_clock(monkeypatch, 40)
    sets = {"model__dropout": 0.1, "data__hflip": True, "train__lr_schedule": "cosine", "train__warmup_steps": 2,
            "train__checkpoint_minutes": 1, "train__keep_checkpoints": 10, "train__max_steps": 6}
    straight = train(run_config(**sets), tmp_path / "straight", progress=False)
    split = tmp_path / "split"  # as a kill after the timed checkpoint of step 2 leaves the run
    shutil.copytree(straight.run_dir, split)
    for ckpt in ("step_00000004", "step_00000006"):
        shutil.rmtree(split / "checkpoints" / ckpt)
    (split / "checkpoints" / "latest").write_text("step_00000002\n")
    resumed = train(run_config(**sets), split, resume=True, progress=False)
    assert resumed.step == 6
    a, b = checkpoint_tensors(straight.checkpoint), checkpoint_tensors(resumed.checkpoint)
    for group in a:
        assert_same_tensors(a[group], b[group])
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (straight.run_dir, split)]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("value", ["0", "0.5", "2", "1e-3"])
def test_checkpoint_minutes_takes_minutes_or_0(value):
    assert apply_overrides(tiny_config(), [f"train.checkpoint_minutes={value}"]).train.checkpoint_minutes == float(value)


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_checkpoint_minutes_refuses_what_is_no_time(value):
    with pytest.raises(ConfigError, match="train.checkpoint_minutes"):
        apply_overrides(tiny_config(), [f"train.checkpoint_minutes={value}"])


def test_checkpoint_minutes_from_the_command_line(capsys, image_folder, tmp_path):
    preset = write_preset(tmp_path / "tiny.toml", config_to_dict(tiny_config(data__path=str(image_folder), train__max_steps=2)))
    assert_user_error(cli(capsys, "train", "--preset", preset, "--out", tmp_path / "bad", "--set", "train.checkpoint_minutes=nan"),
                      "train.checkpoint_minutes = nan", "e.g. 1")
    assert not (tmp_path / "bad").exists()
    assert cli(capsys, "train", "--preset", preset, "--out", tmp_path / "run", "--quiet", "--set", "train.checkpoint_minutes=2.5")[0] == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["checkpoint_minutes"] == 2.5
    assert cli(capsys, "train", "--out", tmp_path / "run", "--resume", "--steps", "3", "--quiet", "--set", "train.checkpoint_minutes=0")[0] == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["checkpoint_minutes"] == 0  # a resume may change it


# ----------------------------------------------------------------------------- checkpoints and outputs


def test_checkpoints_are_complete_and_pruned(run_config, tmp_path):
    result = train(run_config(train__max_steps=5, train__checkpoint_every=1, train__keep_checkpoints=2), tmp_path / "run", progress=False)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000004", "step_00000005"]  # no temp folders left
    assert (folder / "latest").read_text().strip() == "step_00000005" == result.checkpoint.name
    for ckpt in folder.glob("step_*"):
        assert {p.name for p in ckpt.iterdir()} == CHECKPOINT_FILES
        assert json.loads((ckpt / "state.json").read_text())["step"] == int(ckpt.name[5:])


def test_latest_ignores_an_incomplete_checkpoint(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    complete = latest_checkpoint(run)
    (run / "checkpoints" / "step_00000099").mkdir()  # a crash mid-save leaves no pointer to it
    assert latest_checkpoint(run) == complete
    (complete / "state.json").unlink()  # and a pointer to a damaged folder is not trusted
    with pytest.warns(DiffusekitWarning, match="latest' names no complete checkpoint; no checkpoint of this run is intact"):
        assert latest_checkpoint(run) is None


def test_metrics_lines(run_config, tmp_path):
    result = train(run_config(train__max_steps=3), tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"loss", "lr", "images_per_s", "elapsed_s", "epoch"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["lr"] == 1e-3
    assert (result.run_dir / "samples" / "step_00000003.png").is_file()
    assert json.loads((result.run_dir / "config.json").read_text())["train"]["max_steps"] == 3


def test_time_budget_stops_the_run_and_saves(run_config, tmp_path):
    result = train(run_config(train__max_steps=1_000_000, train__budget="1s"), tmp_path / "run", progress=False)
    assert result.stopped_by == "budget" and 0 < result.step < 1_000_000
    assert latest_checkpoint(tmp_path / "run") == result.checkpoint
    assert json.loads((result.checkpoint / "state.json").read_text())["step"] == result.step


def test_gradient_accumulation_matches_one_large_batch(run_config, tmp_path):
    """Batch 8 x accumulation 2 and batch 16 x 1 see the same 16 images and must give the same gradient."""
    grads = {}
    for batch, accumulation in ((16, 1), (8, 2)):
        trainer = Trainer(run_config(train__batch_size=batch, train__grad_accumulation=accumulation, train__grad_clip=0.0),
                          tmp_path / f"run{batch}", DiffusionRecipe, progress=False)
        step = trainer.optimizers["optimizer"].step

        def capture(*args, trainer=trainer, step=step, batch=batch, **kwargs):
            grads[batch] = {name: p.grad.clone() for name, p in trainer.net.named_parameters()}
            return step(*args, **kwargs)

        trainer.optimizers["optimizer"].step = capture
        trainer.train_step()
    for name, grad in grads[16].items():
        torch.testing.assert_close(grads[8][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- optimizer pieces


def test_lr_warmup_then_cosine_to_the_floor():
    tc = tiny_config(train__warmup_steps=10, train__lr_schedule="cosine", train__max_steps=110, train__min_lr_ratio=0.1).train
    assert [lr_at(s, tc) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(60, tc) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway down the cosine
    assert lr_at(110, tc) == pytest.approx(1e-4) and lr_at(500, tc) == pytest.approx(1e-4)


def test_ema_update_and_its_warmup():
    assert ema_decay_at(0, 0.999, warmup=True) == pytest.approx(0.1) and ema_decay_at(0, 0.999, warmup=False) == 0.999
    assert ema_decay_at(10**6, 0.999, warmup=True) == 0.999
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, model, 0.75)
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value, 0.75 * before[key] + 0.25 * model.state_dict()[key])


def test_slim_half_checkpoint_samples_like_the_full_one(trained_run, tmp_path):
    from diffusekit.cli import main as cli_main
    from diffusekit.pipeline import Pipeline

    assert cli_main(["slim", str(trained_run), str(tmp_path / "slim"), "--half"]) == 0
    assert {p.name for p in (tmp_path / "slim").iterdir()} == {"config.json", "state.json", "ema.safetensors"}
    full = Pipeline.from_pretrained(trained_run).sample(2, steps=3, sampler="ddim")
    slim = Pipeline.from_pretrained(tmp_path / "slim").sample(2, steps=3, sampler="ddim")
    assert (full - slim).abs().max() < 0.05 and (full - slim).abs().mean() < 2e-3  # float16 weights, float32 sampling
