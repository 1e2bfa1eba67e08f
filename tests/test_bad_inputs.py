"""Inputs that once ended in a traceback or did the wrong thing: each gets one "error:" line (exit 2)
and loses nothing; files get the user's umask; warnings can be captured; the package's front door."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, cli, random_images, snapshot, tiny_config, write_images, write_preset
from PIL import Image

from diffusekit.config import config_to_dict
from diffusekit.data.folder import load_folder, read_captions
from diffusekit.errors import DiffusekitWarning, UserError
from diffusekit.io.checkpoint import latest_checkpoint
from diffusekit.pipeline import Pipeline

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file that claims width x height pixels (PIL reads the size before any pixel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


# ----------------------------------------------------------------------------- images and captions


def test_a_decompression_bomb_in_a_folder_is_skipped_and_counted(image_folder):
    png_header_only(image_folder / "bomb.png", 40_000, 40_000)  # 1.6 billion pixels: over PIL's limit
    with pytest.warns(DiffusekitWarning, match="bomb.png"):
        images, names, skipped = load_folder(image_folder, 8, 1, bad_images="skip")
    assert skipped == 1 and len(images) == 16 and "bomb.png" not in names


def test_noise_refuses_a_decompression_bomb_and_says_why(capsys, tmp_path):
    bomb = png_header_only(tmp_path / "big.png", 40_000, 40_000)
    assert_user_error(cli(capsys, "noise", bomb, "--out", tmp_path / "strip.png"), "big.png", "decompression bomb")
    assert not (tmp_path / "strip.png").exists()


def test_a_caption_that_is_not_utf8_names_the_file_and_line(image_folder):
    (image_folder / "metadata.jsonl").write_bytes(b'{"file_name": "img_000.png", "text": "fine"}\n{"file_name": "img_001.png", "text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"metadata\.jsonl line 2 is not UTF-8"):
        read_captions(image_folder, ["img_000.png", "img_001.png"])
    (image_folder / "metadata.jsonl").unlink()
    (image_folder / "img_000.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match=r"img_000\.txt is not UTF-8"):
        read_captions(image_folder, ["img_000.png"])


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_when_a_run_starts_is_one_line_and_trains_nothing(capsys, image_folder, tmp_path, monkeypatch):
    preset = write_preset(tmp_path / "tiny.toml", config_to_dict(tiny_config(data__path=str(image_folder), train__max_steps=2)))
    real = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(ENOSPC) if self.name.startswith(".config.json") else real(self, *a, **k))
    assert_user_error(cli(capsys, "train", "--preset", preset, "--out", tmp_path / "run"), "could not write to the run folder", "No space left", "nothing was trained")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_full_disk_when_a_run_resumes_keeps_its_checkpoints(capsys, run_copy, tmp_path, monkeypatch):
    preset = write_preset(tmp_path / "same.toml", json.loads((run_copy / "config.json").read_text()))
    before = snapshot(run_copy / "checkpoints")
    real = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(ENOSPC) if self.name.startswith(".config.json") else real(self, *a, **k))
    assert_user_error(cli(capsys, "train", "--preset", preset, "--out", run_copy, "--resume", "--steps", "4", "--quiet"), "No space left", "checkpoints are intact")
    assert snapshot(run_copy / "checkpoints") == before


@pytest.mark.parametrize("out", ["grid.png", "folder"])
def test_a_full_disk_when_sampling_writes_images_is_one_line(capsys, trained_run, tmp_path, monkeypatch, out):
    monkeypatch.setattr(Image.Image, "save", lambda self, *a, **k: (_ for _ in ()).throw(ENOSPC))
    assert_user_error(cli(capsys, "sample", trained_run, "--n", "2", "--steps", "2", "--out", tmp_path / out), "could not write the samples", "No space left")
    assert not any(p.suffix == ".png" for p in tmp_path.rglob("*"))  # no half-written file left behind


# ----------------------------------------------------------------------------- where outputs go


def test_train_out_that_is_a_file_is_refused(capsys, image_folder, tmp_path):
    preset = write_preset(tmp_path / "tiny.toml", config_to_dict(tiny_config(data__path=str(image_folder), train__max_steps=2)))
    (tmp_path / "notes.txt").write_text("mine")
    assert_user_error(cli(capsys, "train", "--preset", preset, "--out", tmp_path / "notes.txt"), "is a file", "folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_sample_out_that_is_an_existing_file_or_a_folder_named_like_an_image(capsys, trained_run, tmp_path):
    (tmp_path / "notes").write_text("mine")
    assert_user_error(cli(capsys, "sample", trained_run, "--n", "1", "--out", tmp_path / "notes"), "is an existing file")
    assert (tmp_path / "notes").read_text() == "mine"
    (tmp_path / "pictures.png").mkdir()
    assert_user_error(cli(capsys, "sample", trained_run, "--n", "1", "--out", tmp_path / "pictures.png"), "is a folder")
    assert_user_error(cli(capsys, "sample", trained_run, "--n", "1", "--out", tmp_path / "x.png", "--animate", tmp_path / "pictures.png"), "--animate")


def test_overwrite_deletes_only_what_diffusekit_wrote(capsys, run_copy, tmp_path, image_folder):
    preset = write_preset(tmp_path / "same.toml", json.loads((run_copy / "config.json").read_text()))
    for mine in (run_copy / "samples" / "my_favourite.png", run_copy / "eval" / "notes.txt"):
        mine.parent.mkdir(exist_ok=True)
        mine.write_text("mine")
        before = snapshot(run_copy)
        assert_user_error(cli(capsys, "train", "--preset", preset, "--out", run_copy, "--overwrite"), "--overwrite", mine.name)
        assert snapshot(run_copy) == before
        mine.unlink()
    (run_copy / "empty_folder_of_mine").mkdir()
    code, _, err = cli(capsys, "train", "--preset", preset, "--out", run_copy, "--overwrite")
    assert code == 0, err
    assert (run_copy / "empty_folder_of_mine").is_dir() and latest_checkpoint(run_copy) is not None


# ----------------------------------------------------------------------------- checkpoints


def test_a_failed_final_save_without_an_earlier_checkpoint_does_not_advise_resume(capsys, image_folder, tmp_path, monkeypatch):
    import diffusekit.files as files_module

    preset = write_preset(tmp_path / "tiny.toml", config_to_dict(tiny_config(data__path=str(image_folder), train__max_steps=2)))
    monkeypatch.setattr(files_module, "save_file", lambda *a, **k: (_ for _ in ()).throw(ENOSPC))
    code, _, err = cli(capsys, "train", "--preset", preset, "--out", tmp_path / "run", "--quiet")
    assert_user_error((code, "", err), "could not write the final checkpoint", "cannot be resumed")
    assert "--resume" not in err


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_info_on_a_truncated_checkpoint_says_it_is_damaged(capsys, run_copy):
    truncate(latest_checkpoint(run_copy) / "ema.safetensors")
    assert_user_error(cli(capsys, "info", run_copy), "ema.safetensors", "damaged")


def test_resuming_from_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(capsys, image_folder, tmp_path):
    config = config_to_dict(tiny_config(data__path=str(image_folder), train__max_steps=4, train__checkpoint_every=2, train__keep_checkpoints=3))
    preset = write_preset(tmp_path / "tiny.toml", config)
    assert cli(capsys, "train", "--preset", preset, "--out", tmp_path / "run")[0] == 0
    damaged = tmp_path / "run" / "checkpoints" / "step_00000004" / "optimizer.safetensors"
    truncate(damaged)
    kept = damaged.read_bytes()
    code, _, err = cli(capsys, "train", "--preset", preset, "--out", tmp_path / "run", "--resume", "--steps", "6", "--quiet")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and "step_00000004" in warnings[0] and "damaged" in warnings[0]
    assert "using the newest intact checkpoint, step_00000002" in warnings[0]
    assert len(warnings) == 2 and "kept as step_00000004.damaged" in warnings[1]  # when step 4 is saved again
    assert (tmp_path / "run" / "checkpoints" / "step_00000004.damaged" / "optimizer.safetensors").read_bytes() == kept  # kept aside, not deleted


# ----------------------------------------------------------------------------- sampling options


@pytest.mark.parametrize("seed", ["9223372036854775808", "-1", "1e3"])
def test_seeds_out_of_range_are_refused(capsys, trained_run, tmp_path, seed):
    assert_user_error(cli(capsys, "sample", trained_run, "--n", "1", "--seed", seed, "--out", tmp_path / "x.png"), "--seed")


class ZeroNet(torch.nn.Module):
    def forward(self, x, t, **cond):
        return torch.zeros_like(x)


def test_the_largest_seed_works():
    pipe = Pipeline(tiny_config(), ZeroNet())
    assert pipe.sample(1, steps=2, seed=2**63 - 1).shape == (1, 1, 8, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_names_device_cpu(capsys, trained_run, tmp_path):
    assert_user_error(cli(capsys, "sample", trained_run, "--device", "cuda", "--out", tmp_path / "x.png"), "no CUDA GPU", "--device cpu")


def test_unquoted_prompt_words_are_told_to_quote(capsys, tmp_path):
    assert_user_error(cli(capsys, "generate", "a", "red", "apple", "--n", "8", "--steps", "2", "--out", tmp_path / "x.png"),
                      "3 prompts", "quote a prompt of several words", '"a red apple"')


@pytest.mark.parametrize("command", ["sample", "generate"])
def test_help_lists_the_samplers_and_step_schedules(capsys, command):
    code, out, _ = cli(capsys, command, "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "dpmpp_2m_sde" in flat and "euler_ancestral" in flat and "karras" in flat and "trailing" in flat


# ----------------------------------------------------------------------------- files are readable by others


def test_every_file_written_has_the_umask_mode(capsys, image_folder, tmp_path):
    old = os.umask(0o022)
    try:
        preset = write_preset(tmp_path / "tiny.toml", config_to_dict(tiny_config(data__path=str(image_folder), train__max_steps=2)))
        out = tmp_path / "out"
        commands = [
            ["train", "--preset", preset, "--out", out / "run"],
            ["sample", out / "run", "--n", "2", "--steps", "2", "--out", out / "grid.png", "--animate", out / "reverse.gif"],
            ["sample", out / "run", "--n", "2", "--steps", "2", "--out", out / "pngs"],
            ["generate", "red apple", "--n", "1", "--steps", "2", "--out", out / "apple.png"],
            ["export", out / "run", out / "exported"],
            ["slim", out / "run", out / "slim", "--half"],
        ]
        for command in commands:
            code, _, err = cli(capsys, *command)
            assert code == 0, (command, err)
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 15
    modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert {k: v for k, v in modes.items() if v != "0o644"} == {}
    folders = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in out.rglob("*") if p.is_dir()}
    assert {k: v for k, v in folders.items() if v != "0o755"} == {}


# ----------------------------------------------------------------------------- the library's manners


def test_library_warnings_can_be_captured_and_silenced(tmp_path):
    write_images(tmp_path / "images", random_images(2))
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(DiffusekitWarning, match="broken.png"):
        load_folder(tmp_path / "images", 8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DiffusekitWarning)
        assert load_folder(tmp_path / "images", 8, 1)[2] == 1  # silenced: no exception from the "error" filter


def test_the_package_front_door():
    import diffusekit

    assert diffusekit.Pipeline is Pipeline
    assert diffusekit.__version__ and diffusekit.__version__[0].isdigit()
