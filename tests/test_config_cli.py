"""Configs (presets, --set overrides, validation) and the `diffusekit` commands.

A mistake a user can make must end in exit code 2 and one line "error: ..." that names
the problem, with no traceback and nothing of theirs lost.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_user_error, cli, random_images, snapshot, tiny_config, write_images, write_preset
from PIL import Image

from diffusekit.config import Config, apply_overrides, config_from_dict, config_to_dict, diff_configs, load_preset, preset_names
from diffusekit.durations import parse_duration
from diffusekit.errors import ConfigError, UserError
from diffusekit.nn.unet import UNet

# ----------------------------------------------------------------------------- presets


def test_every_preset_loads_and_builds_its_network():
    from diffusekit.models import build_net
    from diffusekit.nn.dit import DiT

    assert {"mnist", "mnist-flow", "mnist-dit", "emoji-dit"} <= set(preset_names())
    for name in preset_names():
        config = load_preset(name)
        assert config.description
        if config.task == "diffusion":
            assert isinstance(build_net(config), DiT if config.model.type == "dit" else UNet)


def test_mnist_preset_is_the_28px_grayscale_digits():
    data = load_preset("mnist").data
    assert (data.dataset, data.image_size, data.channels) == ("mnist", 28, 1)


def test_unknown_preset_suggests_the_near_name():
    with pytest.raises(UserError, match=r"unknown preset 'mnst'\. Did you mean 'mnist'\?.*diffusekit presets"):
        load_preset("mnst")


def test_preset_file_by_path(tmp_path):
    config = tiny_config(data__path="imgs", description="mine")
    path = write_preset(tmp_path / "mine.toml", config_to_dict(config))
    assert load_preset(str(path)) == config


@pytest.mark.parametrize(
    "text, message",
    [
        ("[model]\nchanels = [8, 16]\n", r"unknown config key 'model\.chanels' in .*bad\.toml\. Did you mean 'model\.channels'"),
        ("[modle]\nchannels = [8, 16]\n", r"unknown config key 'modle'.*Did you mean 'model'"),
        ("[model]\nchannels = 'wide'\n", r"model\.channels expects a list of ints, got 'wide'"),
        ("[model\n", r"bad\.toml is not valid TOML"),
    ],
    ids=["key", "section", "type", "syntax"],
)
def test_bad_preset_file_names_the_key_and_the_file(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_preset(str(tmp_path / "bad.toml"))


def test_preset_name_is_not_shadowed_by_a_folder(tmp_path, monkeypatch):
    expected = load_preset("mnist")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()
    assert load_preset("mnist") == expected


# ----------------------------------------------------------------------------- --set


def test_set_values_are_parsed_and_typed():
    config = apply_overrides(Config(), ["model.channels=64,128", "train.lr=2e-4", "data.hflip=true", "data.path=my_images/",
                                        "description=a run", "train.adam_betas=[0.9, 0.95]", "model.attention_levels=1",
                                        "train.budget=10m"])
    assert config.model.channels == (64, 128) and config.model.attention_levels == (1,)
    assert config.train.lr == 2e-4 and config.data.hflip is True and config.data.path == "my_images/"
    assert config.description == "a run" and config.train.adam_betas == (0.9, 0.95) and config.train.budget == "10m"


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("train.lrr=1e-3", r"unknown config key 'train\.lrr' in --set\. Did you mean 'train\.lr'\?"),
        ("train.lr", r"--set expects key=value, got 'train\.lr'"),
        ("train.batch_size=lots", r"train\.batch_size expects an integer, got 'lots'"),
        ("train.max_steps=1.5", r"train\.max_steps expects an integer, got 1\.5"),
        ("data.hflip=1", r"data\.hflip expects true or false, got 1"),
        ("train.adam_betas=0.9", r"train\.adam_betas expects 2 floats, got 1 values"),
        ("train.lr=-1", r"train\.lr must be positive"),
        ("model.dropout=1.5", r"model\.dropout must be in \[0, 1\)"),
        ("diffusion.schedule=exponential", r"diffusion\.schedule = 'exponential' is not one of: .*cosine"),
        ("sample.sampler=magic", r"sample\.sampler = 'magic' is not one of"),
        ("data.image_size=30", r"data\.image_size = 30 cannot pass through the U-Net.*multiple of 4 \(e\.g\. 28 or 32\)"),
        ("model.norm_groups=5", r"model\.channels 32 is not divisible by model\.norm_groups = 5"),
        ("model.attention_head_dim=48", r"model\.attention_head_dim = 48 does not divide the width 64"),
        ("model.attention_levels=3", r"model\.attention_levels has level 3, but there are only levels 0\.\.2"),
        ("train.budget=soon", r"cannot read the duration 'soon'"),
    ],
)
def test_bad_set_is_a_config_error_naming_the_key(assignment, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(load_preset("mnist"), [assignment])


def test_config_json_round_trip_and_diff():
    config = tiny_config(train__adam_betas=[0.8, 0.9], description="x")
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    changed = apply_overrides(config, ["train.lr=5e-4", "model.channels=8,8"])
    assert sorted(diff_configs(config, changed)) == [("model.channels", [8, 16], [8, 8]), ("train.lr", 1e-3, 5e-4)]


def test_durations():
    assert [parse_duration(t) for t in ("90", "90s", "10m", "1h30m", "1.5h", " 2m 30s ")] == [90, 90, 600, 5400, 5400, 150]
    for bad in ("", "10x", "m10", "1h-5m"):
        with pytest.raises(UserError, match="cannot read the duration"):
            parse_duration(bad)


# ----------------------------------------------------------------------------- the CLI: helpers


@pytest.fixture
def preset(tmp_path, image_folder):
    """A tiny preset file on the 16-image folder."""
    values = config_to_dict(tiny_config(data__path=str(image_folder), train__max_steps=2))
    return write_preset(tmp_path / "tiny.toml", values)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the shared trained run (with a preset that matches it), for commands that may change it."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    write_preset(tmp_path / "same.toml", json.loads((trained_run / "config.json").read_text()))
    return copy


# ----------------------------------------------------------------------------- the CLI: user errors


def test_unknown_preset(capsys, tmp_path):
    assert_user_error(cli(capsys, "train", "--preset", "mnst", "--out", tmp_path / "r"), "unknown preset 'mnst'", "mnist")
    assert not (tmp_path / "r").exists()


def test_bad_set(capsys, preset, tmp_path):
    assert_user_error(cli(capsys, "train", "--preset", preset, "--set", "train.lrr=1", "--out", tmp_path / "r"), "train.lrr", "train.lr")


def test_missing_dataset_folder(capsys, preset, tmp_path):
    result = cli(capsys, "train", "--preset", preset, "--set", f"data.path={tmp_path / 'nowhere'}", "--out", tmp_path / "r", "--quiet")
    assert_user_error(result, str(tmp_path / "nowhere"), "does not exist")
    assert not (tmp_path / "r").exists()


def test_empty_dataset_folder(capsys, preset, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli(capsys, "train", "--preset", preset, "--set", f"data.path={tmp_path / 'empty'}", "--out", tmp_path / "r", "--quiet")
    assert_user_error(result, str(tmp_path / "empty"), "holds no PNG, JPEG or WebP images")


def test_resume_with_another_config(capsys, run_copy, tmp_path):
    before = snapshot(run_copy)
    result = cli(capsys, "train", "--preset", tmp_path / "same.toml", "--out", run_copy, "--resume", "--set", "model.channels=8,8", "--quiet")
    assert_user_error(result, "model.channels", "another config")
    assert snapshot(run_copy) == before


def test_existing_out_is_left_untouched(capsys, run_copy, tmp_path):
    before = snapshot(run_copy)
    result = cli(capsys, "train", "--preset", tmp_path / "same.toml", "--out", run_copy, "--quiet")
    assert_user_error(result, str(run_copy), "--resume", "--overwrite")
    assert snapshot(run_copy) == before


def test_overwrite_that_fails_keeps_the_old_run(capsys, run_copy, tmp_path):
    before = snapshot(run_copy)
    result = cli(capsys, "train", "--preset", tmp_path / "same.toml", "--set", f"data.path={tmp_path / 'nowhere'}",
                 "--out", run_copy, "--overwrite", "--quiet")
    assert_user_error(result, "does not exist")
    assert snapshot(run_copy) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(capsys, run_copy, tmp_path):
    (run_copy / "my_notes.txt").write_text("not part of the run")
    before = snapshot(run_copy)
    result = cli(capsys, "train", "--preset", tmp_path / "same.toml", "--out", run_copy, "--overwrite", "--quiet")
    assert_user_error(result, "not part of a diffusekit run", "my_notes.txt")
    assert snapshot(run_copy) == before


def test_resume_without_out(capsys):
    assert_user_error(cli(capsys, "train", "--resume"), "--out")


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(["--sampler", "magic"], id="sampler"),
        pytest.param(["--label", "1"], id="label-unconditional"),
        pytest.param(["--steps", "500"], id="steps-above-T"),
        pytest.param(["--spacing", "sideways"], id="spacing"),
        pytest.param(["--sampler", "ddpm", "--eta", "1"], id="eta-for-ddpm"),
        pytest.param(["--eta", "-1"], id="negative-eta"),
        pytest.param(["--guidance-rescale", "3"], id="rescale-above-1"),
        pytest.param(["--prompt", "a cat"], id="prompt-for-unconditional"),
    ],
)
def test_bad_sample_options(capsys, trained_run, tmp_path, options):
    assert_user_error(cli(capsys, "sample", trained_run, "--n", "1", "--steps", "2", *options, "--out", tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_sample_from_nowhere(capsys, tmp_path):
    assert_user_error(cli(capsys, "sample", tmp_path / "nowhere"), "does not exist")


def test_noise_of_a_missing_image(capsys, tmp_path):
    assert_user_error(cli(capsys, "noise", tmp_path / "no.png", "--out", tmp_path / "strip.png"), "no.png")


def test_user_error_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffusekit", "train", "--preset", "nope", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: unknown preset 'nope'")


# ----------------------------------------------------------------------------- the CLI: commands that work


def test_train_then_resume_from_the_run_alone(capsys, preset, tmp_path):
    code, out, _ = cli(capsys, "train", "--preset", preset, "--out", tmp_path / "r", "--quiet")
    assert code == 0 and "step 2" in out
    code, out, _ = cli(capsys, "train", "--resume", "--out", tmp_path / "r", "--steps", "3", "--quiet")
    assert code == 0 and "step 3" in out
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_info(capsys, trained_run):
    code, out, _ = cli(capsys, "info", trained_run)
    assert code == 0 and "trained      2 steps, 16 images" in out and "widths [8, 16]" in out
    code, out, _ = cli(capsys, "info", trained_run, "--json")
    info = json.loads(out)
    expected_params = sum(p.numel() for p in UNet.from_config(tiny_config().model, in_channels=1).parameters())
    assert code == 0 and info["step"] == 2 and info["has_ema"] and info["parameters"] == expected_params
    assert info["config"]["model"]["channels"] == [8, 16]


def test_presets(capsys):
    code, out, _ = cli(capsys, "presets")
    lines = out.splitlines()
    assert code == 0 and any(line.startswith("mnist ") for line in lines) and load_preset("mnist").description in out
    assert len(lines) == len(preset_names())


def test_sample_grid(capsys, trained_run, tmp_path):
    code, out, _ = cli(capsys, "sample", trained_run, "--n", "4", "--steps", "3", "--out", tmp_path / "grid.png")
    assert code == 0 and "4 samples" in out
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.mode == "L" and grid.width == grid.height >= 256  # 2 x 2 tiles, enlarged


def test_sample_folder_of_pngs(capsys, trained_run, tmp_path):
    code, _, _ = cli(capsys, "sample", trained_run, "--n", "3", "--steps", "2", "--batch-size", "2", "--out", f"{tmp_path / 'out'}/")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sample_00000.png", "sample_00001.png", "sample_00002.png"]
    with Image.open(tmp_path / "out" / "sample_00002.png") as image:
        assert image.size == (8, 8) and image.mode == "L"


def test_sample_animation(capsys, trained_run, tmp_path):
    code, out, _ = cli(capsys, "sample", trained_run, "--n", "2", "--steps", "3", "--out", tmp_path / "g.png", "--animate", tmp_path / "x.gif")
    assert code == 0 and "3 frames" in out
    with Image.open(tmp_path / "x.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 3


@pytest.fixture
def photo(tmp_path):
    return write_images(tmp_path, [random_images(1, size=32, channels=3)[0]], names=["photo.png"])[0]


def test_noise_strip(capsys, photo, tmp_path):
    code, out, _ = cli(capsys, "noise", photo, "--out", tmp_path / "strip.png", "--frames", "4", "--size", "16", "--timesteps", "100")
    assert code == 0 and "t = 0, 33, 66, 99" in out
    with Image.open(tmp_path / "strip.png") as strip:
        assert strip.mode == "RGB" and strip.width > 3 * strip.height


def test_noise_prints_nothing_on_stderr(photo, tmp_path):
    # in a fresh process: PyTorch prints that warning only once per process
    proc = subprocess.run([sys.executable, "-m", "diffusekit", "noise", str(photo), "--out", str(tmp_path / "strip.png"), "--size", "16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "strip.png").is_file()
    assert proc.stderr == ""


def test_sample_is_reproducible_by_seed(capsys, trained_run, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert cli(capsys, "sample", trained_run, "--n", "2", "--steps", "2", "--seed", seed, "--out", f"{tmp_path / name}/")[0] == 0
    read = {name: np.asarray(Image.open(tmp_path / name / "sample_00001.png")) for name in "abc"}
    assert np.array_equal(read["a"], read["b"]) and not np.array_equal(read["a"], read["c"])


def test_eval_of_a_run_writes_a_report_into_the_run(capsys, run_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    code, out, _ = cli(capsys, "eval", run_copy, "--n", "12", "--steps", "2")
    assert code == 0 and "FD" in out and "precision" in out
    reports = list((run_copy / "eval").glob("*.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["n"] == 12


def test_eval_of_an_image_folder_against_mnist(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    from diffusekit.data.mnist import load_mnist

    digits = load_mnist()[0][::500, 0].numpy()  # one of each digit
    write_images(tmp_path / "digits", digits)
    code, out, _ = cli(capsys, "eval", "--images", tmp_path / "digits", "--ref", "mnist", "--json", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["n"] == 10 and report["features"] == "mnist"
    assert sorted(report["class_histogram"]) == [0.1] * 10  # the digit net names each real digit
