"""ControlNet training (controlnet_training.py, `diffusekit train-controlnet`) on the tiny Stable Diffusion of conftest:
only the ControlNet trains and it learns a toy task (where a square is, from its edges), the base stays as it was,
a resume is bit-exact, the run's ControlNet folder loads with --controlnet, and mistakes are one clear message."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("cv2")

from conftest import assert_user_error, cli, snapshot, write_images  # noqa: E402

from diffusekit.annotators import annotate  # noqa: E402
from diffusekit.conditioning import conditions  # noqa: E402
from diffusekit.controlnet_training import controlnet_config, train_controlnet  # noqa: E402
from diffusekit.errors import UserError  # noqa: E402
from diffusekit.files import read_tensors  # noqa: E402
from diffusekit.losses import diffusion_loss  # noqa: E402
from diffusekit.nn.controlnet import ControlledUNet, ControlNet  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402

CAPTION = "a red square"


def squares(count: int, seed: int = 0) -> np.ndarray:
    """16 px RGB images of a red square somewhere on black: only the control (its edges) says where."""
    rng, images = np.random.default_rng(seed), np.zeros((count, 16, 16, 3), dtype=np.uint8)
    for image in images:
        x, y = rng.integers(0, 9, 2)
        image[y : y + 7, x : x + 7, 0] = 255
    return images


@pytest.fixture(scope="module")
def square_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("squares") / "squares"
    write_images(folder, squares(8))
    files = sorted(p.name for p in folder.iterdir())
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": CAPTION}) + "\n" for f in files))
    return folder


def trained(base, data, run, *sets, control="canny", resume=False):
    config = controlnet_config(base, data, control, ["train.batch_size=8", "train.threads=1", "sample.steps=2", "sample.n=4", *sets])
    return train_controlnet(config, run, resume=resume, progress=False)


def data_loss(pipe: Pipeline, controlnet: ControlNet, images: np.ndarray) -> float:
    """The diffusion loss of the base steered by `controlnet` on `images` (with their Canny edges), at fixed timesteps and noise."""
    uint8 = torch.from_numpy(images).permute(0, 3, 1, 2)
    x0 = pipe.encode(uint8.float() / 127.5 - 1).repeat(4, 1, 1, 1)
    control = (annotate(uint8, "canny").float() / 255).repeat(4, 1, 1, 1)
    cond, _ = conditions(pipe.config, pipe.text_encoder, pipe.device, len(x0), prompts=CAPTION)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, pipe.schedule.num_timesteps, (len(x0),), generator=g)
    with torch.no_grad():
        return diffusion_loss(ControlledUNet(pipe.net, controlnet), pipe.schedule, x0, prediction=pipe.config.diffusion.prediction,
                              sigma=pipe.schedule.t_to_sigma(t), noise=torch.randn(x0.shape, generator=g), cond={**cond, "control": control}).item()


def test_only_the_controlnet_trains_it_learns_and_the_base_stays_as_it_was(sd_folder, square_folder, tmp_path):
    before = snapshot(sd_folder)
    result = trained(sd_folder, square_folder, tmp_path / "edges", "train.max_steps=150", "train.lr=1e-3", "train.ema_decay=0",
                     "train.sample_every=150", "train.checkpoint_every=150")
    assert snapshot(sd_folder) == before  # the base's files, byte for byte
    weights = read_tensors(result.checkpoint / "model.safetensors")
    assert any(k.startswith("controlnet_down_blocks.") for k in weights) and not any(k.startswith("up_blocks.") for k in weights)
    assert {p.name for p in (result.run_dir / "samples").glob("*.png")} == {"step_00000000.png", "step_00000150.png"}  # before and after

    pipe = Pipeline.from_pretrained(sd_folder, device="cpu", dtype="fp32")
    fresh = ControlNet.from_unet(pipe.net, pipe.config.model, embedding_channels=(16, 32))  # zero convolutions: the base itself
    name = pipe.load_controlnet(result.run_dir)  # the run folder stands for its controlnet/
    learnt, held_out = pipe.controlnets[name][0], squares(8, seed=1)
    assert data_loss(pipe, learnt, held_out) < 0.75 * data_loss(pipe, fresh, held_out)  # 150 steps: about 0.58x


def test_a_resume_is_bit_exact(sd_folder, square_folder, tmp_path):
    sets = ("train.checkpoint_every=2", "train.log_every=1", "train.warmup_steps=2")
    straight = trained(sd_folder, square_folder, tmp_path / "straight", "train.max_steps=4", *sets)
    trained(sd_folder, square_folder, tmp_path / "split", "train.max_steps=2", *sets)
    resumed = trained(sd_folder, square_folder, tmp_path / "split", "train.max_steps=4", *sets, resume=True)
    assert resumed.step == straight.step == 4
    for name in ("model", "ema", "optimizer"):
        a, b = (read_tensors(r.checkpoint / f"{name}.safetensors") for r in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [[json.loads(line)["loss"] for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for r in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_scribbles_and_a_folder_of_control_images(sd_folder, square_folder, tmp_path):
    images = torch.from_numpy(squares(8)).permute(0, 3, 1, 2)
    scribbles = annotate(images, "scribble", seed=0)
    assert torch.equal(scribbles, annotate(images, "scribble", seed=0)) and not torch.equal(scribbles, annotate(images, "canny"))
    assert (scribbles > 0).sum() > (annotate(images, "canny") > 0).sum()  # thickened
    controls = tmp_path / "controls"
    write_images(controls, scribbles.permute(0, 2, 3, 1).numpy(), names=sorted(p.name for p in square_folder.glob("*.png")))
    result = trained(sd_folder, square_folder, tmp_path / "run", "train.max_steps=1", control=str(controls))
    assert (result.run_dir / "controlnet" / "config.json").is_file()
    # --overwrite knows the run's controlnet/ folder as the run's own: the same run again, from scratch
    again = train_controlnet(controlnet_config(sd_folder, square_folder, str(controls), ["train.batch_size=8", "train.threads=1", "sample.steps=2",
                                                                                          "sample.n=4", "train.max_steps=1"]),
                             result.run_dir, overwrite=True, progress=False)
    assert again.step == 1 and (result.run_dir / "controlnet" / "config.json").is_file()
    (controls / sorted(p.name for p in controls.iterdir())[0]).unlink()
    with pytest.raises(UserError, match="has no image named"):
        trained(sd_folder, square_folder, tmp_path / "run2", "train.max_steps=1", control=str(controls))


def test_bad_inputs_are_one_clear_message(capsys, sd_folder, square_folder, trained_run, tmp_path, monkeypatch):
    assert_user_error(cli(capsys, "train-controlnet", sd_folder, "--out", tmp_path / "a"), "needs --data FOLDER", "--control")
    assert_user_error(cli(capsys, "train-controlnet", sd_folder, "--data", square_folder, "--control", "sobel", "--out", tmp_path / "a"),
                      "'sobel'", "canny, scribble")
    assert_user_error(cli(capsys, "train-controlnet", trained_run, "--data", square_folder, "--control", "canny", "--out", tmp_path / "a"),
                      "not a text-to-image U-Net")
    with pytest.raises(UserError, match="data.hflip"):
        trained(sd_folder, square_folder, tmp_path / "b", "train.max_steps=1", "data.hflip=true")
    monkeypatch.setitem(sys.modules, "cv2", None)  # OpenCV not installed
    with pytest.raises(UserError, match="pip install opencv-python-headless"):
        trained(sd_folder, square_folder, tmp_path / "c", "train.max_steps=1")
    assert not any((tmp_path / name / "checkpoints").exists() for name in "abc")
