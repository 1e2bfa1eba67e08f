"""Datasets: the user's image folder (formats, modes, resizing, bad files), MNIST, and the batch stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_images, write_images
from PIL import Image

from diffusekit.config import DataConfig
from diffusekit.data import BatchStream, load_dataset
from diffusekit.data.folder import load_folder
from diffusekit.data.mnist import load_mnist
from diffusekit.errors import DiffusekitWarning, UserError


def solid(color, size=(8, 8)) -> np.ndarray:
    """An RGB or RGBA image of one colour, [H, W, C]."""
    return np.broadcast_to(np.array(color, dtype=np.uint8), (size[1], size[0], len(color))).copy()


def load(folder, size=8, channels=3, bad_images="skip", limit=0):
    return load_folder(folder, size, channels, bad_images, limit, progress=False)


# ----------------------------------------------------------------------------- formats and modes


def test_png_jpeg_webp_found_recursively(tmp_path):
    write_images(tmp_path, [solid((200, 40, 40))] * 4, names=["a.png", "sub/b.jpg", "sub/deeper/c.JPEG", "d.webp"])
    (tmp_path / "notes.txt").write_text("not an image")
    images, names, skipped = load(tmp_path)
    assert sorted(names) == ["a.png", "d.webp", "sub/b.jpg", "sub/deeper/c.JPEG"]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8) and skipped == 0
    # lossy formats come back close to the colour
    assert (images.int() - torch.tensor([200, 40, 40]).view(1, 3, 1, 1)).abs().max() <= 6


def test_rgb_converted_to_grayscale_and_back(tmp_path):
    write_images(tmp_path, [solid((255, 0, 0)), np.full((8, 8), 90, dtype=np.uint8)])
    gray, _, _ = load(tmp_path, channels=1)
    rgb, _, _ = load(tmp_path, channels=3)
    assert gray.shape == (2, 1, 8, 8) and rgb.shape == (2, 3, 8, 8)
    assert gray[0].unique().tolist() == [76]  # ITU-R 601 luma of pure red: 0.299 * 255
    assert gray[1].unique().tolist() == [90]
    assert torch.equal(rgb[1], torch.full((3, 8, 8), 90, dtype=torch.uint8))


def test_alpha_is_composited_on_white(tmp_path):
    write_images(tmp_path, [solid((0, 0, 0, 0)), solid((0, 0, 0, 255)), solid((0, 0, 255, 128))])
    images, _, _ = load(tmp_path, channels=3)
    assert torch.equal(images[0], torch.full((3, 8, 8), 255, dtype=torch.uint8))  # transparent -> white
    assert torch.equal(images[1], torch.zeros(3, 8, 8, dtype=torch.uint8))  # opaque black stays black
    assert images[2, :, 0, 0].tolist() == pytest.approx([127, 127, 255], abs=1)  # half blue over white


def test_palette_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    images, _, _ = load(tmp_path, channels=1)
    assert images.unique().tolist() == [255]


def test_resize_and_center_crop(tmp_path):
    # 48 x 16 (w x h): black side bands of 8 px around a white centre of 32 px
    wide = np.zeros((16, 48), dtype=np.uint8)
    wide[:, 8:40] = 255
    # 16 x 48 (w x h): a white top third, a grey middle and a black bottom third
    tall = np.concatenate([np.full((16, 16), 255), np.full((16, 16), 128), np.zeros((16, 16))]).astype(np.uint8)
    write_images(tmp_path, [wide, tall])
    images, _, _ = load(tmp_path, channels=1)
    assert images.shape == (2, 1, 8, 8)
    assert torch.all(images[0] == 255)  # shorter side to 8 px, then the centre 8 px: all white
    middle = images[1].int()
    assert (middle[:, 2:6] - 128).abs().max() <= 2 and (middle - 128).abs().max() <= 10  # the centre third (edges ring a little)


def test_small_images_are_enlarged(tmp_path):
    write_images(tmp_path, [solid((10, 20, 30), size=(4, 4))])
    images, _, _ = load(tmp_path, size=8)
    assert images.shape == (1, 3, 8, 8)
    assert images[0, :, 4, 4].tolist() == [10, 20, 30]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)  # 0 .. 64512
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    images, _, _ = load(tmp_path, channels=1)
    assert (images[0, 0].int() - torch.from_numpy(ramp.astype(np.int64) >> 8)).abs().max() <= 1


# ----------------------------------------------------------------------------- bad files and folders


@pytest.fixture
def folder_with_bad_files(tmp_path):
    write_images(tmp_path, random_images(3, channels=3))
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    Image.fromarray(random_images(1, size=64, channels=3)[0]).save(tmp_path / "whole.jpg", quality=95)
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:600])
    (tmp_path / "whole.jpg").unlink()
    return tmp_path


def test_bad_files_are_reported_skipped_and_counted(folder_with_bad_files):
    with pytest.warns(DiffusekitWarning) as warned:
        images, names, skipped = load(folder_with_bad_files, bad_images="skip")
    err = "\n".join(str(w.message) for w in warned)
    assert skipped == 2 and images.shape[0] == 3 and "noise.png" not in names
    assert str(folder_with_bad_files / "noise.png") in err and str(folder_with_bad_files / "truncated.jpg") in err
    assert "skipped 2" in err


def test_bad_file_aborts_with_its_path(folder_with_bad_files):
    with pytest.raises(UserError, match=r"noise\.png.*bad_images=skip"):
        load(folder_with_bad_files, bad_images="abort")


def test_folder_of_only_bad_files_is_a_user_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="none of the 1 image files"):
        load(tmp_path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: write_images(p, random_images(1))[0], "is a file, not a folder"),
        (lambda p: p, "holds no PNG, JPEG or WebP images"),
    ],
    ids=["missing", "file", "empty"],
)
def test_unusable_folder_is_a_user_error(tmp_path, make, message):
    (tmp_path / "readme.txt").write_text("no images here")
    path = make(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_limit_takes_the_first_files(image_folder):
    dataset = load_dataset(DataConfig(dataset="folder", path=str(image_folder), image_size=8, channels=1, limit=5), progress=False)
    full, _, _ = load(image_folder, channels=1)
    assert len(dataset) == 5 and torch.equal(dataset.images, full[:5]) and dataset.labels is None


# ----------------------------------------------------------------------------- mnist


def test_mnist_is_5000_digits_500_per_label():
    images, labels = load_mnist()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.float().mean() < 60  # white digits on black


def test_mnist_dataset_is_fitted_to_the_config():
    dataset = load_dataset(DataConfig(dataset="mnist", image_size=16, channels=3, limit=100), progress=False)
    assert dataset.images.shape == (100, 3, 16, 16) and dataset.num_classes == 10 and len(dataset.labels) == 100
    assert torch.bincount(dataset.labels, minlength=10).min() >= 3  # a prefix (data.limit) holds every digit
    assert torch.equal(dataset.images[:, 0], dataset.images[:, 2])


# ----------------------------------------------------------------------------- batch stream


def stream_indices(stream: BatchStream, batches: int) -> torch.Tensor:
    return torch.cat([stream.next_indices() for _ in range(batches)])


@pytest.mark.parametrize("n, batch", [(12, 4), (10, 3)])
def test_batch_stream_visits_every_index_once_per_epoch(n, batch):
    seen = stream_indices(BatchStream(n, batch, seed=0), batches=n * 3 // batch)
    epochs = seen[: n * 3].view(3, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled


def test_batch_stream_is_deterministic_per_seed():
    a, b, c = (stream_indices(BatchStream(50, 8, seed=s), 10) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batch_stream_resumes_the_exact_sequence():
    stream = BatchStream(10, 3, seed=1)
    stream_indices(stream, 5)  # into the second epoch
    state = stream.state_dict()
    expected = stream_indices(stream, 6)
    resumed = BatchStream(10, 3, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(stream_indices(resumed, 6), expected)


def test_ranks_partition_the_global_batch():
    single = BatchStream(20, 6, seed=2)
    ranks = [BatchStream(20, 3, seed=2, rank=r, world=2) for r in range(2)]
    for _ in range(7):
        parts = [r.next_indices() for r in ranks]
        assert len(parts[0]) == len(parts[1]) == 3
        assert set(parts[0].tolist()).isdisjoint(parts[1].tolist())
        assert sorted(torch.cat(parts).tolist()) == sorted(single.next_indices().tolist())


def test_empty_stream_is_a_user_error():
    with pytest.raises(UserError, match="empty"):
        BatchStream(0, 4, seed=0)
