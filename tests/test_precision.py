"""Precision as a choice (fp32 / bf16 / fp16 / auto), its quality guard, and torch.compile with a way back."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, cli, tiny_config

from diffusekit import precision
from diffusekit.compiled import CompiledNetwork, compile_network
from diffusekit.config import load_preset
from diffusekit.errors import DiffusekitWarning, UserError
from diffusekit.models import build_net
from diffusekit.pipeline import Pipeline

# One bf16 U-Net call against fp32 on the same weights and inputs, relative to the output's spread:
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%), and the errors of ~30 layers add up.
# Measured: mean 0.013, max 0.085 on an AMD EPYC Zen 2 (bf16 emulated); mean 0.0127-0.0128, max 0.077-0.079 on a
# Zen 5 (AVX512-BF16, native), in each of layout.py's three layouts.
BF16_MEAN_TOLERANCE = 0.02  # mean |bf16 - fp32| / std(fp32)
BF16_MAX_TOLERANCE = 0.15  # max |bf16 - fp32| / std(fp32)


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend (or deny) that this CPU has native bf16 (and let the flags decide: no DIFFUSEKIT_AUTO_PRECISION)."""
    monkeypatch.delenv("DIFFUSEKIT_AUTO_PRECISION", raising=False)

    def set_native(value: bool):
        info = {**precision.cpu_info(), "native_bf16": value}
        monkeypatch.setattr(precision, "cpu_info", lambda: info)
        precision.warn_if_emulated.cache_clear()

    yield set_native
    precision.warn_if_emulated.cache_clear()


def trained_like_unet(config, seed=0):
    """A U-Net whose weights are not at their zero initialisation (so every layer matters)."""
    torch.manual_seed(seed)
    net = build_net(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def test_the_cpu_detection_reads_the_flags_honestly():
    info = precision.cpu_info()
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    assert info["native_bf16"] == bool({"avx512_bf16", "amx_bf16"} & flags) or "bf16" in flags
    assert set(info["flags"]) <= flags and info["physical_cores"] >= 1 and info["torch_capability"]


def test_auto_picks_bf16_only_where_the_cpu_has_it(native_bf16):
    cpu = torch.device("cpu")
    native_bf16(True)
    assert precision.inference_dtype("auto", cpu) == torch.bfloat16 and precision.training_dtype("auto", cpu) == torch.bfloat16
    native_bf16(False)
    assert precision.inference_dtype("auto", cpu) == torch.float32 and precision.training_dtype("auto", cpu) is None
    assert precision.training_dtype("fp32", cpu) is None


def test_bf16_without_native_support_works_and_warns_once(native_bf16):
    native_bf16(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert precision.inference_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert [str(w.message) for w in caught if w.category is DiffusekitWarning] == [
        "bf16 on this CPU is emulated (no AVX512-BF16 / AMX-BF16): it works, but is slower than fp32; --precision auto picks fp32 here"]


def test_fp16_on_a_cpu_names_bf16(capsys, trained_run, tmp_path):
    with pytest.raises(UserError, match="fp16 is not supported on a CPU.*--precision bf16"):
        precision.inference_dtype("fp16", torch.device("cpu"))
    assert_user_error(cli(capsys, "sample", trained_run, "--precision", "fp16", "--device", "cpu", "--out", tmp_path / "x.png"), "--precision bf16")
    with pytest.raises(UserError, match="fp16 is not supported.*use bf16"):
        precision.training_dtype("fp16", torch.device("cpu"))


def test_one_bf16_unet_call_stays_within_the_stated_tolerance_of_fp32():
    config = load_preset("mnist")
    fp32 = trained_like_unet(config)
    bf16 = trained_like_unet(config).to(torch.bfloat16)
    x, t = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.linspace(10, 990, 8)
    with torch.no_grad():
        ref, low = fp32(x, t), bf16(x.bfloat16(), t).float()
    spread = ref.std()
    assert (low - ref).abs().mean() / spread < BF16_MEAN_TOLERANCE
    assert (low - ref).abs().max() / spread < BF16_MAX_TOLERANCE
    assert not torch.equal(low, ref)  # it really ran in bf16


def test_a_bf16_pipeline_keeps_the_sampler_in_float32_and_samples_close_to_fp32(native_bf16):
    native_bf16(True)
    config = tiny_config()
    ref = Pipeline(config, trained_like_unet(config), dtype="fp32")
    low = Pipeline(config, trained_like_unet(config), dtype="auto")
    assert low.precision == "bf16" and next(low.net.parameters()).dtype == torch.bfloat16
    seen = []
    a = ref.sample(4, steps=5, sampler="dpmpp_2m", seed=3)
    b = low.sample(4, steps=5, sampler="dpmpp_2m", seed=3, callback=lambda info: seen.append((info["x"].dtype, info["denoised"].dtype)))
    assert b.dtype == torch.float32 and set(seen) == {(torch.float32, torch.float32)}
    assert (a - b).abs().mean() < 0.005 and not torch.equal(a, b)  # measured 6.2e-4 on a Zen 5 (native bf16)


def test_the_model_hash_is_the_stored_weights_at_every_precision_layout_and_with_fused_loras(tmp_path):
    """One identity per model: the "Model hash" and the U-Net fingerprint are taken from the stored weights, so fp32
    and bf16, channels-last and contiguous give the same; a fused LoRA changes it the same way at each precision."""
    from diffusekit.image_info import fingerprint
    from diffusekit.io.lora import save_lora
    from diffusekit.models import default_model
    from diffusekit.nn import lora
    from diffusekit.nn.state import weights_fingerprint

    config = tiny_config()
    stored = trained_like_unet(config)
    tuned = trained_like_unet(config)
    for layer in lora.inject_lora(tuned, "style", rank=2).values():
        torch.nn.init.normal_(layer.up, std=0.1)
    save_lora(tmp_path / "style.safetensors", tuned, "style")

    def pipe(dtype, layout):
        net = trained_like_unet(config).to(memory_format=layout)
        return Pipeline(config, net, dtype=dtype)

    pipes = [pipe(dtype, layout) for dtype in ("fp32", "bf16") for layout in (torch.contiguous_format, torch.channels_last)]
    base = {p.fingerprint for p in pipes}
    assert base == {fingerprint(stored)} and {p.stored_fingerprints["unet"] for p in pipes} == {weights_fingerprint(stored)}
    assert fingerprint(pipes[2].net) != fingerprint(stored)  # a bf16 copy's own values differ: the hash is taken before the cast
    for p in pipes:
        p.load_lora(tmp_path / "style.safetensors", scale=0.5)
        p.fuse_lora()
    fused = {p.fingerprint for p in pipes}
    assert len(fused) == 1 and fused != base
    for p in pipes:
        p.unfuse_lora()
        p.set_lora_scales({"style": 0.25})
        p.fuse_lora()
    assert len({p.fingerprint for p in pipes}) == 1 and {p.fingerprint for p in pipes} not in (base, fused)
    for p in pipes:
        p.unload_lora()
    assert {p.fingerprint for p in pipes} == base
    # the shipped model's hash, as images made before this change recorded it, at both precisions
    assert {Pipeline.from_pretrained(default_model(), device="cpu", dtype=d).fingerprint for d in ("fp32", "bf16")} == {"2bd427b0ef"}


def test_torch_dtype_is_diffusers_name_for_it(trained_run):
    pipe = Pipeline.from_pretrained(trained_run, device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.precision == "bf16"


def test_bf16_training_keeps_float32_master_weights(image_folder, tmp_path):
    from diffusekit.diffusion_training import DiffusionRecipe
    from diffusekit.trainer import Trainer

    trainer = Trainer(tiny_config(data__path=str(image_folder), train__precision="bf16", train__max_steps=2), tmp_path / "run", DiffusionRecipe, progress=False)
    assert trainer.autocast_dtype == torch.bfloat16
    result = trainer.run()
    assert result.step == 2 and all(p.dtype == torch.float32 for p in trainer.net.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())


# ----------------------------------------------------------------------------- torch.compile


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.conv = torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, t=None):
        return self.conv(torch.nn.functional.silu(self.norm(x)))


def test_compile_gives_the_eager_result_and_keeps_the_parameter_names():
    torch.manual_seed(0)
    net = Small().eval()
    compiled = compile_network(net)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
    assert not compiled.failed and compiled.compile_seconds > 0
    assert compiled.state_dict().keys() == net.state_dict().keys()


def test_a_compiler_that_fails_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(net, mode=None):
        def run(*args, **kwargs):
            raise RuntimeError("C++ compile error: g++ not found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = Small().eval()
    compiled = CompiledNetwork(net)
    x = torch.randn(2, 4, 8, 8)
    with pytest.warns(DiffusekitWarning, match="torch.compile could not compile the network .*g\\+\\+ not found.*eager") as caught:
        with torch.no_grad():
            out1, out2 = compiled(x), compiled(x)
    assert len(caught) == 1 and compiled.failed
    torch.testing.assert_close(out1, net(x).detach())
    torch.testing.assert_close(out2, out1)


def test_cli_compile_that_fails_is_one_warning_line_not_a_traceback(capsys, trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda net, mode=None: (lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler"))))
    code, out, err = cli(capsys, "sample", trained_run, "--n", "1", "--steps", "2", "--compile", "--out", tmp_path / "x.png")
    assert code == 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        line for line in err.splitlines() if "torch.compile could not compile" in line] and "torch.compile could not compile" in err
    assert "eagerly: compilation failed" in out and (tmp_path / "x.png").is_file()


def test_info_system_says_what_auto_picks(capsys):
    code, out, _ = cli(capsys, "info", "--system")
    assert code == 0 and "native bf16" in out and "auto on cpu" in out and precision.cpu_info()["model"] in out


def test_the_auto_precision_switch_takes_either_path_on_any_cpu(capsys, monkeypatch):
    """DIFFUSEKIT_AUTO_PRECISION makes auto pick bf16 (emulated where the CPU lacks it) or fp32 whatever the flags."""
    cpu = torch.device("cpu")
    for value, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        monkeypatch.setenv("DIFFUSEKIT_AUTO_PRECISION", value)
        assert precision.inference_dtype("auto", cpu) == dtype and (precision.training_dtype("auto", cpu) or torch.float32) == dtype
        code, out, _ = cli(capsys, "info", "--system")
        assert code == 0 and f"sampling in {value}" in out and f"DIFFUSEKIT_AUTO_PRECISION={value} is set" in out
    monkeypatch.setenv("DIFFUSEKIT_AUTO_PRECISION", "fast")
    assert_user_error(cli(capsys, "info", "--system"), "DIFFUSEKIT_AUTO_PRECISION='fast' is not bf16 or fp32", "unset it")
