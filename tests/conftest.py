"""Shared fixtures: a tiny config, image folders, fake networks and a tiny trained run.

Everything here is sized for a 2-core CPU: U-Nets of widths 8/16, 8x8 images,
T = 100 timesteps, a handful of optimizer steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.config import Config, update_config, validate
from diffusekit.schedule import NoiseSchedule

# Ho et al.'s betas (1e-4 .. 0.02 over T = 1000) rescaled to T = 100, so that the
# last step is still almost pure noise (abar_T ~ 4e-5).
TINY_T = 100
TINY_BETAS = (1e-3, 0.2)

TINY = {
    "model": {
        "channels": [8, 16],
        "layers_per_block": 1,
        "attention_levels": [1],
        "mid_attention": True,
        "attention_head_dim": 8,
        "norm_groups": 4,
    },
    "diffusion": {"schedule": "linear", "timesteps": TINY_T, "beta_start": TINY_BETAS[0], "beta_end": TINY_BETAS[1]},
    "data": {"dataset": "folder", "path": "set-me", "image_size": 8, "channels": 1},
    "train": {
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 0,
        "ema_decay": 0.9,
        "max_steps": 4,
        "device": "cpu",
        "threads": 1,
        "precision": "fp32",
        "log_every": 1,
        "checkpoint_every": 1000,
    },
    "sample": {"steps": 5, "n": 4},
}


def tiny_config(**sets) -> Config:
    """The tiny config with `section__key=value` overrides, e.g. tiny_config(train__max_steps=2, description="x")."""
    values: dict = {section: dict(keys) for section, keys in TINY.items()}
    for name, value in sets.items():
        section, _, key = name.rpartition("__")
        if section:
            values.setdefault(section, {})[key] = value
        else:
            values[key] = value
    return validate(update_config(Config(), values, "tests"))


def tiny_schedule(**kwargs) -> NoiseSchedule:
    cfg = tiny_config(**{f"diffusion__{k}": v for k, v in kwargs.items()}).diffusion
    return NoiseSchedule.from_config(cfg)


def write_preset(path: Path, values: dict) -> Path:
    """Write a config dict ({section: {key: value}}) as a TOML preset file."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items() if not isinstance(value, dict)]
    for section, keys in values.items():
        if isinstance(keys, dict):
            lines += ["", f"[{section}]"] + [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Keep torch on one thread: on a loaded 2-core machine two threads spin and crawl. Pin the memory layout.

    Pipeline.from_pretrained asks for every core (as it should for users); here it gets one.
    """
    torch.set_num_threads(1)
    monkeypatch.setattr("diffusekit.pipeline.use_all_cores", lambda threads=0: 1)
    # One memory layout for every test (what a timed first use picks would vary with the load and count extra network
    # calls); tests/test_layout.py unsets it to test the measurement itself.
    monkeypatch.setenv("DIFFUSEKIT_LAYOUT", "channels_last")
    yield
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- both precision paths
# `--precision auto` (the CLI's default) computes in bf16 on CPUs with native bf16 (AVX512-BF16, AMX) and in fp32
# elsewhere. A test marked `both_precisions` runs once per path on every CPU (DIFFUSEKIT_AUTO_PRECISION, where
# bf16 is emulated it is slower); the other tests take the path of the CPU they run on. The marked subset is the
# tests where the path changes what is checked: hashes, recorded parameters, LoRA fusing, closeness to fp32.


def pytest_configure(config):
    config.addinivalue_line("markers", "both_precisions: run once with --precision auto as bf16 and once as fp32, on any CPU")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("both_precisions"):
        metafunc.fixturenames.append("auto_precision")
        metafunc.parametrize("auto_precision", ["auto-bf16", "auto-fp32"], indirect=True)


@pytest.fixture
def auto_precision(request, monkeypatch) -> str:
    """What `auto` picks on a CPU in this test: bf16 or fp32 (DIFFUSEKIT_AUTO_PRECISION, precision.py)."""
    dtype = request.param.removeprefix("auto-")
    monkeypatch.setenv("DIFFUSEKIT_AUTO_PRECISION", dtype)
    return dtype


# ----------------------------------------------------------------------------- the CLI


def cli(capsys, *args) -> tuple[int, str, str]:
    """`diffusekit ARGS` in this process: (exit code, stdout, stderr)."""
    from diffusekit.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result, *fragments):
    """Exit code 2, one line on stderr starting with 'error:' and naming the fragments; no traceback."""
    code, _, err = result
    shown = [line.rsplit("\r", 1)[-1].strip() for line in err.split("\n")]  # a terminal shows what follows a progress bar's last \r
    lines = [line for line in shown if line]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- image files


def write_images(folder: Path, arrays, suffix: str = ".png", names=None) -> list[Path]:
    """Write uint8 arrays ([H, W] gray, [H, W, 3] RGB or [H, W, 4] RGBA) as image files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(arrays):
        path = folder / (names[i] if names else f"img_{i:03d}{suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def random_images(count: int, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (count, size, size) if channels == 1 else (count, size, size, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """16 random 8x8 grayscale PNGs."""
    folder = tmp_path / "images"
    write_images(folder, random_images(16))
    return folder


# ----------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run trained for 2 steps (shared by the tests that only read it)."""
    from diffusekit.diffusion_training import train

    root = tmp_path_factory.mktemp("trained")
    write_images(root / "images", random_images(16, seed=1))
    config = tiny_config(data__path=str(root / "images"), train__max_steps=2)
    train(config, root / "run", progress=False)
    return root / "run"


# ----------------------------------------------------------------------------- fake networks


class TargetNet(torch.nn.Module):
    """A 'network' that knows the clean image x0 and returns its exact target at x_t.

    It must be called on the timestep grid or between grid points; abar(t) follows the
    schedule's own interpolation (t_to_sigma), so any mistake in how the caller maps
    sigma to t, or x to x_t, shows up as a wrong target.
    """

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule, prediction: str):
        super().__init__()
        self.x0, self.schedule, self.prediction = x0, schedule, prediction
        self.calls: list[torch.Tensor] = []

    def forward(self, x_t, t, **cond):
        from diffusekit.denoiser import prediction_target
        from diffusekit.schedule import sigma_to_alpha_sigma

        self.calls.append(t.detach().clone())
        alpha, s = sigma_to_alpha_sigma(self.schedule.t_to_sigma(t.to(torch.float64)))
        a, b = (c.view(-1, *[1] * (x_t.ndim - 1)) for c in (alpha, s))
        eps = (x_t.double() - a * self.x0.double()) / b
        return prediction_target(self.prediction, self.x0.double(), eps, alpha, s).to(x_t.dtype)


# ----------------------------------------------------------------------------- a tiny Stable Diffusion (diffusers)
# For the parity tests against diffusers (test_diffusers_io.py, test_lora.py); diffusers and transformers
# are imported only when these are used.

PROMPT = "a red apple"


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Move every weight off diffusers' initialisation (some layers start at zero or one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return module.eval()


def tiny_clip():
    """A 2-layer CLIPTextModel and a CLIPTokenizer over single letters plus a couple of merges."""
    import transformers

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(letters) + [c + "</w>" for c in letters] + ["re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {word: i for i, word in enumerate(words)}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[("r", "e"), ("re", "d</w>")], model_max_length=77)
    end = vocab["<|endoftext|>"]
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end)
    torch.manual_seed(0)
    return perturb(transformers.CLIPTextModel(config), 1), tokenizer


def sd_scheduler(**changes):
    """Stable Diffusion 1.x's scheduler settings."""
    import diffusers

    settings = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return diffusers.DDIMScheduler(**{**settings, **changes})


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline folder: 16 px images, 8x8 latents."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,
    )
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=4, sample_size=16)
    text_encoder, tokenizer = tiny_clip()
    pipe = diffusers.StableDiffusionPipeline(vae=perturb(vae, 2), text_encoder=text_encoder, tokenizer=tokenizer, unet=perturb(unet, 3),
                                             scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe.save_pretrained(folder)
    return folder


def initial_latents(n: int = 1, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def run_diffusers(pipe, scheduler, latents, steps: int, guidance: float, output_type: str = "pt") -> torch.Tensor:
    pipe.scheduler = scheduler
    return pipe([PROMPT] * len(latents), num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(), output_type=output_type).images


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - torch.as_tensor(b).float()).abs().max())
