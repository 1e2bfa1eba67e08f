"""The memory layout chosen per CPU and network (layout.py): measured once, cached outside the run, forced by
DIFFUSEKIT_LAYOUT; a damaged, stale or unwritable cache never stops a command."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import assert_user_error, cli, tiny_config

from diffusekit import layout
from diffusekit.errors import DiffusekitWarning
from diffusekit.models import build_net, example_inputs
from diffusekit.nn.blocks import GroupNorm
from diffusekit.pipeline import Pipeline

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFUSEKIT_LAYOUT", raising=False)
    return tmp_path / "cache" / "layouts.json"


def net_and_inputs(batch=4):
    config = tiny_config()
    torch.manual_seed(0)
    return build_net(config).eval(), example_inputs(config, batch, CPU)


def conv_layout(net) -> str:
    weight = next(m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1))
    return "channels_last" if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous() else "contiguous"


def fixed_times(monkeypatch, times: dict, calls: list):
    monkeypatch.setattr(layout, "time_layouts", lambda net, call: calls.append(1) or dict(times))


def norms_nchw(net) -> set[bool]:
    return {m.nchw_inside for m in net.modules() if isinstance(m, GroupNorm)}


@pytest.mark.parametrize("faster", list(layout.LAYOUTS))
def test_the_fastest_layout_is_measured_once_then_read_from_the_cache(cache, monkeypatch, faster):
    net, inputs = net_and_inputs()
    calls = []
    fixed_times(monkeypatch, {name: 1.0 if name == faster else 2.0 for name in layout.LAYOUTS}, calls)
    memory_format, nchw = layout.LAYOUTS[faster]
    expected = "contiguous" if memory_format == torch.contiguous_format else "channels_last"
    assert layout.choose_layout(net, inputs) == faster and conv_layout(net) == expected and norms_nchw(net) == {nchw} and len(calls) == 1
    entry = next(iter(json.loads(cache.read_text())["layouts"].values()))
    assert entry["layout"] == faster
    layout.apply_layout(net, next(name for name in layout.LAYOUTS if name != faster))
    assert layout.choose_layout(net, inputs) == faster and conv_layout(net) == expected and len(calls) == 1  # the cache answered
    layout.choose_layout(net, example_inputs(tiny_config(), 2, CPU))  # another batch shape: measured on its own
    assert len(calls) == 2 and len(json.loads(cache.read_text())["layouts"]) == 2


def test_a_real_measurement_leaves_the_rng_and_the_gradients_as_they_were(cache):
    net, inputs = net_and_inputs()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    for training in (False, True):
        assert layout.choose_layout(net.train(training), inputs, training=training) in layout.LAYOUTS
    assert torch.equal(torch.rand(3), expected) and all(p.grad is None for p in net.parameters())
    modes = {entry["mode"] for entry in layout.cached_choices()}
    assert modes == {"sampling in fp32", "training in fp32"}


def test_a_damaged_or_stale_cache_is_ignored_with_one_warning_and_rebuilt(cache, monkeypatch):
    net, inputs = net_and_inputs()
    calls = []
    fixed_times(monkeypatch, {"channels_last": 2.0, "contiguous": 1.0, "channels_last_nchw_norms": 3.0}, calls)
    cache.parent.mkdir(parents=True)
    for damaged in ("{not json", json.dumps({"version": 0, "layouts": {}}), json.dumps({"version": 1, "layouts": {"k": {"layout": "diagonal"}}})):
        cache.write_text(damaged)
        with pytest.warns(DiffusekitWarning, match="layout cache .* (unreadable|stale or damaged)") as seen:
            assert layout.choose_layout(net, inputs) == "contiguous"
        assert len([w for w in seen if "layout cache" in str(w.message)]) == 1
        assert json.loads(cache.read_text())["version"] == layout.CACHE_VERSION  # rebuilt
    assert len(calls) == 3


def test_a_cache_folder_that_cannot_be_written_never_stops_a_command(tmp_path, monkeypatch, capsys, trained_run):
    monkeypatch.delenv("DIFFUSEKIT_LAYOUT")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(blocker / "cache"))  # its parent is a file: no folder can be made there (even as root)
    net, inputs = net_and_inputs()
    with pytest.warns(DiffusekitWarning, match="cannot save the layout choice .* measured again next time"):
        assert layout.choose_layout(net, inputs) in layout.LAYOUTS
    code, _, err = cli(capsys, "sample", trained_run, "--n", "2", "--steps", "2", "--out", tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").is_file() and "warning: cannot save the layout choice" in err
    assert len([line for line in err.splitlines() if "layout" in line]) == 1  # one warning line, the sampling went on


def test_the_layout_can_be_forced_and_a_bad_value_is_one_error(cache, monkeypatch, capsys):
    net, inputs = net_and_inputs()
    monkeypatch.setattr(layout, "time_layouts", lambda *a: pytest.fail("a forced layout is not measured"))
    for forced in layout.LAYOUTS:
        monkeypatch.setenv("DIFFUSEKIT_LAYOUT", forced)
        assert layout.choose_layout(net, inputs) == forced and norms_nchw(net) == {layout.LAYOUTS[forced][1]}
    code, out, _ = cli(capsys, "info", "--system")
    assert code == 0 and "DIFFUSEKIT_LAYOUT is set" in out
    monkeypatch.setenv("DIFFUSEKIT_LAYOUT", "diagonal")
    assert_user_error(cli(capsys, "info", "--system"), "DIFFUSEKIT_LAYOUT='diagonal' is not one of channels_last, contiguous, channels_last_nchw_norms")


def test_pipelines_and_training_take_the_measured_layout_and_info_shows_it(cache, monkeypatch, capsys, image_folder, tmp_path):
    from diffusekit.diffusion_training import DiffusionRecipe
    from diffusekit.trainer import Trainer

    calls = []
    fixed_times(monkeypatch, {"channels_last": 2.0, "contiguous": 1.0, "channels_last_nchw_norms": 3.0}, calls)
    config = tiny_config(data__path=str(image_folder), train__max_steps=1)
    trainer = Trainer(config, tmp_path / "run", DiffusionRecipe, progress=False)
    assert trainer.recipe.layout == "contiguous" and conv_layout(trainer.net) == "contiguous" and conv_layout(trainer.ema) == "contiguous"
    pipe = Pipeline.from_parts(trainer_parts(trainer), device="cpu")
    assert conv_layout(pipe.net) == "channels_last"  # placed as before, until the first sampling call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.sample(2, steps=2, seed=0)
    assert conv_layout(pipe.net) == "contiguous" and list(pipe.layouts.values()) == ["contiguous"]
    code, out, _ = cli(capsys, "info", "--system")
    assert code == 0 and "layout       contiguous for UNet x(2, 1, 8, 8), sampling in fp32" in out and "training in fp32" in out


def trainer_parts(trainer):
    from diffusekit.models import ModelParts

    return ModelParts(config=trainer.config, net=trainer.ema, vae=None, text_encoder=None, source=None, step=0)


def test_every_layout_computes_the_same_network():
    net, (x, t, cond) = net_and_inputs()
    outputs = {}
    with torch.no_grad():
        for name in layout.LAYOUTS:
            layout.apply_layout(net, name)
            outputs[name] = net(x.contiguous(memory_format=layout.LAYOUTS[name][0]), t, **cond)
    reference = outputs["contiguous"]
    assert all((out - reference).abs().max() < 1e-5 for out in outputs.values())
    layout.apply_layout(net, "channels_last_nchw_norms")
    norm = next(m for m in net.modules() if isinstance(m, GroupNorm))
    h = torch.randn(2, norm.num_channels, 6, 6).contiguous(memory_format=torch.channels_last)
    assert norm(h).is_contiguous(memory_format=torch.channels_last)  # the copy goes back to the convolutions' layout


def test_a_pipeline_switches_layouts_between_batch_shapes_only_when_they_differ(cache, monkeypatch):
    answers = iter([{"channels_last": 2.0, "contiguous": 1.0, "channels_last_nchw_norms": 3.0},
                    {"channels_last": 1.0, "contiguous": 2.0, "channels_last_nchw_norms": 3.0}])
    monkeypatch.setattr(layout, "time_layouts", lambda net, call: next(answers))
    net, _ = net_and_inputs()
    pipe = Pipeline(tiny_config(), net)
    applied = []
    real_apply = layout.apply_layout
    monkeypatch.setattr("diffusekit.pipeline.apply_layout", lambda n, name: applied.append(name) or real_apply(n, name))
    for n, expected in ((2, "contiguous"), (2, "contiguous"), (3, "channels_last"), (2, "contiguous")):
        pipe.sample(n, steps=1, seed=0)
        assert conv_layout(pipe.net) == expected
    assert applied == ["contiguous"]  # measured shapes are left in their layout; only the return to batch 2 converts again
