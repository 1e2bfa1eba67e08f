"""`diffusekit finetune` and `--lora FILE[:SCALE]` from the command line, and every bad input of the LoRA issue:
a LoRA of another base, an unknown key layout, a scale that is not a number, a model without attention layers
each give one `error:` line naming the file, key or value and the fix, and the base model's files never change."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import assert_user_error, cli, snapshot, tiny_config, write_images
from safetensors import safe_open
from safetensors.torch import save_file
from test_finetune import squares

from diffusekit.diffusion_training import train
from diffusekit.io.checkpoint import latest_checkpoint, load_parts
from diffusekit.models import default_model
from diffusekit.nn.state import weights_fingerprint

FAST = ["--quiet", "--lora-rank", "2", "--set", "train.threads=1", "--set", "sample.steps=2", "--set", "sample.n=4", "--set", "train.batch_size=4"]


@pytest.fixture(scope="module")
def tuned_run(trained_run, tmp_path_factory):
    """A LoRA of the tiny trained run (3 steps, a high learning rate so that it changes the samples), made with the CLI."""
    root = tmp_path_factory.mktemp("tuned")
    write_images(root / "data", squares(4))
    from diffusekit.cli import main

    before = snapshot(trained_run)
    assert main(["finetune", str(trained_run), "--data", str(root / "data"), "--out", str(root / "run"), "--steps", "3", "--set", "train.lr=5e-2", *FAST]) == 0
    assert snapshot(trained_run) == before
    return root / "run"


@pytest.mark.both_precisions
def test_sample_with_loras_at_scales(capsys, trained_run, tuned_run, tmp_path):
    before = snapshot(trained_run)
    sample = ["sample", trained_run, "--n", "2", "--steps", "3"]
    assert cli(capsys, *sample, "--out", tmp_path / "base.png")[0] == 0
    code, out, _ = cli(capsys, *sample, "--lora", f"{tuned_run}:0", "--out", tmp_path / "zero.png")
    assert code == 0 and f"LoRA lora from {tuned_run} at scale 0" in out
    # net scale 1 - 2.5 = -1.5: in bf16 a net 0.5 of this 3-step LoRA can round away below a pixel level
    assert cli(capsys, *sample, "--lora", tuned_run / "lora.safetensors", "--lora", f"{tuned_run}:-2.5", "--out", tmp_path / "two.png")[0] == 0
    from PIL import Image

    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("base", "zero", "two")}
    assert np.array_equal(pixels["zero"], pixels["base"])  # scale 0 changes no pixel (the PNG records the LoRA at 0)
    assert not np.array_equal(pixels["two"], pixels["base"])
    assert 'LoRA: "lora:0"' in Image.open(tmp_path / "zero.png").info["parameters"]
    assert snapshot(trained_run) == before  # loading and fusing LoRAs never writes the base


@pytest.mark.both_precisions
def test_serve_fuses_the_loras_into_its_models_and_images_record_them(capsys, trained_run, tuned_run, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    import uvicorn
    from fastapi.testclient import TestClient
    from PIL import Image

    from diffusekit.images import parse_parameters

    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: served.update(app=server.config.app))
    code, out, _ = cli(capsys, "serve", "--model", trained_run, "--lora", f"{tuned_run}:0.5", "--outputs", tmp_path / "outputs")
    assert code == 0 and f"LoRA lora from {tuned_run} at scale 0.5" in out
    with TestClient(served["app"], base_url="http://127.0.0.1:7860") as client:  # the Host guard admits loopback names only
        job = client.post("/api/jobs", json={"steps": 3, "seed": 4}).json()
        while client.get(f"/api/jobs/{job['id']}").json()["status"] not in ("done", "failed"):
            time.sleep(0.05)
        png = client.get(client.get(f"/api/jobs/{job['id']}").json()["images"][0]["url"]).content
    (tmp_path / "served.png").write_bytes(png)
    assert parse_parameters(Image.open(tmp_path / "served.png").info["parameters"])["LoRA"] == "lora:0.5"
    code, _, err = cli(capsys, "sample", trained_run, "--from", tmp_path / "served.png", "--out", tmp_path / "again.png")  # without the LoRA
    assert code == 0 and "with the LoRAs lora:0.5" in err and "--lora" in err
    code, _, err = cli(capsys, "sample", trained_run, "--from", tmp_path / "served.png", "--lora", f"{tuned_run}:0.5", "--out", tmp_path / "same.png")
    assert code == 0 and "warning" not in err


def test_info_and_sampling_a_finetune_run(capsys, tuned_run, trained_run):
    code, out, _ = cli(capsys, "info", tuned_run)
    assert code == 0 and "lora         rank 2, alpha 2 on attention" in out and f"base {trained_run}" in out
    assert_user_error(cli(capsys, "sample", tuned_run), "is a LoRA fine-tuning run", f"--model {trained_run} --lora {tuned_run}")


def test_resume_from_the_command_line(capsys, trained_run, tuned_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tuned_run, run)
    lr = ["--set", "train.lr=5e-2"]
    assert cli(capsys, "finetune", trained_run, "--out", run, "--resume", "--steps", "4", *lr, *FAST)[0] == 0  # --data: the run's own
    assert json.loads((run / "checkpoints" / "step_00000004" / "state.json").read_text())["step"] == 4
    assert_user_error(cli(capsys, "finetune", "--out", run, "--resume", "--steps", "5", *lr, *FAST),  # BASE left out: the demo model is not it
                      "is not the model", "resume with that BASE")
    assert cli(capsys, "finetune", trained_run, "--data", tuned_run.parent / "data", "--out", run, "--overwrite", "--steps", "1", *FAST)[0] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]


@pytest.mark.both_precisions
def test_the_shipped_demo_model_is_the_default_base(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    images = np.full((4, 32, 32, 3), 255, dtype=np.uint8)
    images[:, 8:24, 8:24] = [200, 0, 200]
    write_images(tmp_path / "data", images)
    (tmp_path / "data" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img_{i:03d}.png", "text": "a purple square"}) + "\n" for i in range(4)))
    demo = default_model()
    before = snapshot(demo)
    assert cli(capsys, "finetune", "--data", tmp_path / "data", "--out", tmp_path / "run", "--steps", "1", *FAST)[0] == 0
    with safe_open(str(tmp_path / "run" / "lora.safetensors"), "pt") as f:
        header = f.metadata()
    assert header["diffusekit.base_fingerprint"] == weights_fingerprint(load_parts(demo).net) and json.loads(header["diffusekit.prompts"]) == ["a purple square"]
    code, out, _ = cli(capsys, "generate", "a purple square", "--lora", tmp_path / "run", "--n", "1", "--steps", "2", "--out", tmp_path / "g.png")
    assert code == 0 and (tmp_path / "g.png").is_file()
    assert snapshot(demo) == before


# ----------------------------------------------------------------------------- bad input


def test_a_scale_that_is_not_a_number(capsys, trained_run, tuned_run):
    assert_user_error(cli(capsys, "sample", trained_run, "--lora", f"{tuned_run}:strong"), "argument --lora", "'strong' is not a number", "style.safetensors:0.8")
    assert_user_error(cli(capsys, "sample", trained_run, "--lora", f"{tuned_run}:nan"), "'nan' is not a number")


@pytest.mark.both_precisions
def test_a_lora_made_for_another_base(capsys, tuned_run, tmp_path, image_folder):
    other = tmp_path / "wider"
    train(tiny_config(data__path=str(image_folder), train__max_steps=1, model__channels=[8, 24]), other, progress=False)
    before, _ = snapshot(other), capsys.readouterr()
    assert_user_error(cli(capsys, "sample", other, "--lora", tuned_run, "--out", tmp_path / "x.png"),
                      str(tuned_run / "lora.safetensors"), "lora_A.weight' has shape", "needs", "made for another base model", "load it into the model it was trained on")
    assert snapshot(other) == before and not (tmp_path / "x.png").exists()
    assert_user_error(cli(capsys, "serve", "--model", other, "--lora", tuned_run), "lora_A.weight' has shape", "made for another base model")


def test_an_unknown_key_layout(capsys, trained_run, tmp_path):
    save_file({"lora_unet_mid.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    assert_user_error(cli(capsys, "sample", trained_run, "--lora", tmp_path / "loha.safetensors"),
                      "loha.safetensors", "cannot place the key 'lora_unet_mid.hada_w1_a'", "neither a diffusers/peft key")
    (tmp_path / "empty").mkdir()
    assert_user_error(cli(capsys, "sample", trained_run, "--lora", tmp_path / "empty"), "is a folder without lora.safetensors")
    assert_user_error(cli(capsys, "sample", trained_run, "--lora", tmp_path / "missing.safetensors"), "does not exist")


def test_fine_tuning_a_model_without_attention_layers(capsys, image_folder, tmp_path):
    base = tmp_path / "plain"
    train(tiny_config(data__path=str(image_folder), train__max_steps=1, model__attention_levels=[], model__mid_attention=False), base, progress=False)
    before, _ = snapshot(base), capsys.readouterr()
    assert_user_error(cli(capsys, "finetune", base, "--data", image_folder, "--out", tmp_path / "run", *FAST),
                      f"cannot fine-tune '{base}'", "no attention layers to fine-tune", "--lora-targets conv")
    assert snapshot(base) == before and not (tmp_path / "run").exists()
    assert cli(capsys, "finetune", base, "--data", image_folder, "--out", tmp_path / "run", "--lora-targets", "conv", "--steps", "1", *FAST)[0] == 0


def test_other_finetune_mistakes(capsys, trained_run, tuned_run, image_folder, tmp_path):
    assert_user_error(cli(capsys, "finetune", trained_run, "--out", tmp_path / "run"), "finetune needs --data FOLDER")
    assert_user_error(cli(capsys, "finetune", tuned_run, "--data", image_folder), "is a LoRA fine-tuning run: fine-tune its base model")
    cond = tmp_path / "cond"
    shutil.copytree(latest_checkpoint(trained_run), cond)
    config = json.loads((cond / "config.json").read_text())
    config["model"]["num_classes"] = 2
    (cond / "config.json").write_text(json.dumps(config))  # a class-conditional model's config is enough: it is refused before its weights are read
    assert_user_error(cli(capsys, "finetune", cond, "--data", image_folder), "is class-conditional", "fine-tune a text-to-image or an unconditional model")
    assert_user_error(cli(capsys, "finetune", trained_run, "--data", image_folder, "--text-encoder", "--out", tmp_path / "t", *FAST),
                      "has no text encoder to fine-tune")
    assert_user_error(cli(capsys, "finetune", trained_run, "--data", image_folder, "--prior-images", "2", "--prior-data", image_folder),
                      "not both")
