"""What a hostile user tried: absurd sizes, outputs over inputs, a run folder over its teacher, LoRAs of NaN or
huge scales, a mask blur of NaN, metadata.jsonl files listing missing images. Each is one `error:` line (exit 2)
before anything is allocated or written, and the user's files stay as they were."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, cli, random_images, snapshot, tiny_config, write_images, write_preset
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import save_file

from diffusekit.config import config_to_dict
from diffusekit.config_checks import MAX_IMAGE_SIDE, check_image_size
from diffusekit.data.folder import describe_captions, read_captions
from diffusekit.errors import DiffusekitWarning, UserError
from diffusekit.io.checkpoint import load_parts
from diffusekit.io.lora import METADATA_KEY, save_lora
from diffusekit.nn.lora import inject_lora
from diffusekit.pipeline import Pipeline

QUICK = ["--n", "1", "--steps", "2"]


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def made_png(path: Path, parameters: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    Image.new("L", (8, 8)).save(path, pnginfo=info)
    return path


# ----------------------------------------------------------------------------- 1. image sizes


@pytest.mark.parametrize("size, message", [("100000x100000", f"at most {MAX_IMAGE_SIDE} pixels a side"), ("abcx32", "not WIDTHxHEIGHT"),
                                           ("-32x-32", "not WIDTHxHEIGHT"), ("8x16", "not square"), ("7x7", "not a multiple of 2"),
                                           ("0x0", "out of range")])
def test_a_size_recorded_in_a_png_is_checked_before_anything_is_allocated(capsys, trained_run, tmp_path, size, message):
    source = made_png(tmp_path / "made.png", f"Steps: 2, Sampler: ddim, Seed: 1, Size: {size}")
    before = snapshot(tmp_path)
    assert_user_error(cli(capsys, "sample", trained_run, "--from", source, "--out", tmp_path / "again.png"), message)
    assert snapshot(tmp_path) == before


def test_a_size_flag_names_the_limit_and_the_sizes_that_work(capsys, tmp_path):
    assert_user_error(cli(capsys, "generate", "rocket", "--size", "100000", "--out", tmp_path / "x.png"),
                      "--size 100000", f"at most {MAX_IMAGE_SIDE} pixels a side", "use a multiple of")
    source = made_png(tmp_path / "big.png", "rocket\nSteps: 2, Sampler: ddim, Seed: 1, Size: 100000x100000")
    assert_user_error(cli(capsys, "generate", "--from", source, "--out", tmp_path / "x.png"),
                      f"the Size 100000x100000 that '{source}' records is out of range", f"at most {MAX_IMAGE_SIDE} pixels")
    assert not (tmp_path / "x.png").exists()


def test_a_size_beyond_this_machines_memory_is_refused(capsys, trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr("diffusekit.config_checks.physical_memory", lambda: 2**30)
    assert_user_error(cli(capsys, "sample", trained_run, "--n", "64", "--size", "2048", "--out", tmp_path / "x.png"),
                      "--size 2048", "GiB", "more than this machine's 1 GiB", "--batch-size")
    with pytest.raises(UserError, match="size=2048: sampling 64 image"):  # the Python API, through the same check
        Pipeline.from_pretrained(trained_run, device="cpu").sample(64, size=2048)
    config = tiny_config()
    assert check_image_size(config, 16, 2) == 16
    for size in (3, 0, 2.5, True, 10**9):
        with pytest.raises(UserError, match="use a multiple of 2"):
            check_image_size(config, size, 2)


# ----------------------------------------------------------------------------- 2. outputs never replace files, nor inputs


def test_edit_never_writes_over_its_init_image_or_mask_even_with_overwrite(capsys, trained_run, tmp_path):
    Image.fromarray(random_images(1)[0]).save(tmp_path / "in.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "mask.png")
    before = snapshot(tmp_path)
    for flags in ([], ["--overwrite"]):
        assert_user_error(cli(capsys, "edit", tmp_path / "in.png", "--model", trained_run, *QUICK, "--out", tmp_path / "in.png", *flags),
                          "the init image", "which this command reads")
        assert_user_error(cli(capsys, "edit", tmp_path / "in.png", "--model", trained_run, "--mask", tmp_path / "mask.png", *QUICK,
                              "--out", tmp_path / "mask.png", *flags), "the mask")
    assert snapshot(tmp_path) == before


def test_generate_never_writes_over_its_from_png_even_with_overwrite(capsys, trained_run, tmp_path):
    code, _, err = cli(capsys, "sample", trained_run, "--n", "4", "--steps", "2", "--out", tmp_path / "made")
    assert code == 0, err
    before = snapshot(tmp_path)
    for flags in ([], ["--overwrite"]):
        assert_user_error(cli(capsys, "generate", "--model", trained_run, "--from", tmp_path / "made" / "sample_00003.png",
                              "--out", tmp_path / "made", *flags), "sample_00003.png' would be written over --from")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["sample", "generate"])
def test_existing_outputs_are_kept_without_overwrite(capsys, trained_run, tmp_path, command):
    model = [trained_run] if command == "sample" else ["rocket"]  # generate: the shipped text-to-image model
    make = [command, *model, *QUICK]
    (tmp_path / "grid.png").write_bytes(b"mine")
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "sample_00000.png").write_bytes(b"mine too")
    (tmp_path / "reverse.gif").write_bytes(b"and mine")
    before = snapshot(tmp_path)
    assert_user_error(cli(capsys, *make, "--out", tmp_path / "grid.png"), "grid.png already exists", "--overwrite")
    assert_user_error(cli(capsys, *make, "--out", tmp_path / "pngs"), "sample_00000.png already exists")
    assert_user_error(cli(capsys, *make, "--out", tmp_path / "new.png", "--animate", tmp_path / "reverse.gif"), "reverse.gif already exists")
    assert snapshot(tmp_path) == before
    assert cli(capsys, *make, "--out", tmp_path / "pngs", "--index", "1")[0] == 0  # sample_00001.png: nothing replaced
    assert (tmp_path / "pngs" / "sample_00000.png").read_bytes() == b"mine too"
    assert cli(capsys, *make, "--out", tmp_path / "grid.png", "--overwrite")[0] == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- 3. run folders apart from their inputs


def test_distill_into_its_teacher_is_refused_whatever_the_flags(capsys, run_copy):
    before = snapshot(run_copy)
    for flags in (["--overwrite"], []):
        assert_user_error(cli(capsys, "distill", run_copy, "--out", run_copy, "--train-steps", "1", "--quiet", *flags),
                          f"--out '{run_copy}' is the teacher '{run_copy}'", "choose another --out")
    assert_user_error(cli(capsys, "distill", run_copy, "--out", run_copy / "checkpoints" / "student", "--train-steps", "1"), "lies inside the teacher")
    assert_user_error(cli(capsys, "distill", "--resume", "--overwrite", "--out", run_copy), "--resume and --overwrite contradict")
    assert snapshot(run_copy) == before


def test_finetune_and_train_refuse_an_out_over_their_base_or_data(capsys, run_copy, image_folder, tmp_path):
    runs, images = snapshot(run_copy), snapshot(image_folder)
    assert_user_error(cli(capsys, "finetune", run_copy, "--data", image_folder, "--out", run_copy, "--overwrite", "--quiet"), "is the base model")
    assert_user_error(cli(capsys, "finetune", run_copy, "--data", image_folder, "--out", image_folder / "lora", "--quiet"), "lies inside the image folder")
    preset = write_preset(tmp_path / "tiny.toml", config_to_dict(tiny_config(data__path=str(image_folder), train__max_steps=1)))
    assert_user_error(cli(capsys, "train", "--preset", preset, "--out", image_folder, "--overwrite"), "is the image folder (data.path)")
    assert_user_error(cli(capsys, "train", "--preset", preset, "--out", tmp_path, "--overwrite"), "holds the image folder")
    assert_user_error(cli(capsys, "train", "--preset", preset, "--out", run_copy, "--resume", "--overwrite"), "--resume and --overwrite contradict")
    assert snapshot(run_copy) == runs and snapshot(image_folder) == images


# ----------------------------------------------------------------------------- 4. LoRAs and networks that give NaN


@pytest.fixture
def lora_file(trained_run, tmp_path) -> Path:
    """A rank-2 LoRA of the tiny run's attention layers, with random A and B."""
    net = load_parts(trained_run).net
    torch.manual_seed(0)
    for lora in inject_lora(net, "style", rank=2).values():
        lora.up.data.normal_(0, 0.1)
    return save_lora(tmp_path / "style.safetensors", net, "style")


def rewritten(lora_file: Path, out: Path, tensor=None, header=None) -> Path:
    with safe_open(str(lora_file), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    if tensor is not None:
        key = next(iter(tensors))
        tensors[key] = torch.full_like(tensors[key], tensor)
    if header is not None:
        config = json.loads(metadata[METADATA_KEY])
        config.update(header)
        metadata[METADATA_KEY] = json.dumps(config)
    save_file(tensors, out, metadata=metadata)
    return out


@pytest.mark.parametrize("change, message", [(dict(tensor=float("nan")), "NaN or infinite values"),
                                             (dict(tensor=float("inf")), "NaN or infinite values"),
                                             (dict(header={"unet.lora_alpha": 1e308}), "alpha 1e+308"),
                                             (dict(scale="1e308"), "scale 1e+308")])
def test_a_lora_that_would_make_nan_images_is_refused_at_loading(capsys, trained_run, lora_file, tmp_path, change, message):
    scale = change.pop("scale", None)
    path = rewritten(lora_file, tmp_path / "bad.safetensors", **change) if change else lora_file
    spec = f"{path}:{scale}" if scale else path
    assert_user_error(cli(capsys, "sample", trained_run, *QUICK, "--lora", spec, "--out", tmp_path / "x.png"), str(path), message)
    assert not (tmp_path / "x.png").exists()
    assert cli(capsys, "sample", trained_run, *QUICK, "--lora", f"{lora_file}:0.5", "--out", tmp_path / "fine.png")[0] == 0


def test_the_python_api_refuses_the_same_loras_and_scales(trained_run, lora_file, tmp_path):
    pipe = Pipeline.from_pretrained(trained_run)
    with pytest.raises(UserError, match="NaN or infinite values"):
        pipe.load_lora(rewritten(lora_file, tmp_path / "nan.safetensors", tensor=float("nan")))
    name = pipe.load_lora(lora_file, scale=0.5)
    with pytest.raises(UserError, match="overflow float32"):
        pipe.set_lora_scales({name: 1e300})
    assert pipe.lora_scales[name] == 0.5


class NaNBelow(torch.nn.Module):
    """A network that gives NaN once the timestep falls below `t`."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, x, t, **cond):
        return torch.where(t.view(-1, 1, 1, 1) < self.t, torch.nan, 0.0).expand_as(x).to(x.dtype)


def test_a_network_that_gives_nan_while_sampling_warns_once_naming_the_cause():
    pipe = Pipeline(tiny_config(), NaNBelow(50))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.sample(3, steps=5, batch_size=1)
    said = [str(w.message) for w in caught if issubclass(w.category, DiffusekitWarning)]
    assert len(said) == 1 and "NaN or infinite" in said[0] and "LoRAs' weights and scales" in said[0], said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pipeline(tiny_config(), NaNBelow(-1)).sample(2, steps=3)  # a finite network: no warning


@pytest.mark.parametrize("blur", ["nan", "inf", "-1", "1e300"])
def test_a_mask_blur_that_is_no_number_of_pixels_is_refused(capsys, trained_run, tmp_path, blur):
    Image.fromarray(random_images(1)[0]).save(tmp_path / "in.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "mask.png")
    assert_user_error(cli(capsys, "edit", tmp_path / "in.png", "--model", trained_run, "--mask", tmp_path / "mask.png", "--mask-blur", blur,
                          *QUICK, "--out", tmp_path / "x.png"), "--mask-blur", "from 0 to")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- 5. captions in several metadata.jsonl files


def two_metadata_folders(root: Path, missing: bool) -> Path:
    for part in ("a", "b"):
        write_images(root / part, random_images(4, seed=ord(part)), names=[f"{part}{i}.png" for i in range(4)])
        lines = [json.dumps({"file_name": f"{part}{i}.png", "text": f"{part} number {i}"}) for i in range(4)]
        (root / part / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    if missing:
        for i in range(4):
            (root / "b" / f"b{i}.png").unlink()
    return root


def test_captions_come_from_every_metadata_jsonl_and_a_missing_listed_image_is_an_error(tmp_path):
    full = two_metadata_folders(tmp_path / "full", missing=False)
    names = [f"{part}/{part}{i}.png" for part in "ab" for i in range(4)]
    captions = read_captions(full, names)
    assert captions == [f"{part} number {i}" for part in "ab" for i in range(4)]
    assert describe_captions(full, 8, captions) == f"read 8 images from {full}: 8 captioned, from 2 metadata.jsonl files"
    half = two_metadata_folders(tmp_path / "half", missing=True)
    with pytest.raises(UserError, match=r"4 image file\(s\) listed in metadata.jsonl are missing: b0.png, b1.png, b2.png, b3.png .*b/metadata.jsonl"):
        read_captions(half, names[:4])


def test_finetune_on_a_folder_with_missing_listed_images_trains_nothing(capsys, trained_run, tmp_path):
    data = two_metadata_folders(tmp_path / "data", missing=True)
    assert_user_error(cli(capsys, "finetune", trained_run, "--data", data, "--out", tmp_path / "lora", "--steps", "1", "--quiet"),
                      "are missing: b0.png", str(data / "b" / "metadata.jsonl"), "add the images or remove their lines")
    assert not (tmp_path / "lora" / "checkpoints").exists()
    full = two_metadata_folders(tmp_path / "full", missing=False)
    code, out, err = cli(capsys, "finetune", trained_run, "--data", full, "--out", tmp_path / "ok", "--steps", "1", "--quiet", "--lora-rank", "2",
                         "--set", "sample.steps=2", "--set", "sample.n=2", "--set", "train.batch_size=4")
    assert code == 0, err
    assert f"read 8 images from {full}: 8 captioned, from 2 metadata.jsonl files" in out
