"""Few-step students: the distillation targets against closed forms, distillation runs end to end (pixel, class-
and text-conditional with guidance distillation, latent), a bit-exact resume, sampling the students, the bad inputs."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import TargetNet, assert_user_error, cli, random_images, tiny_config, tiny_schedule, write_images

from diffusekit.denoiser import ConsistencyDenoiser, Denoiser, boundary_scalings
from diffusekit.diffusion_training import train
from diffusekit.distill import DistillRecipe, distill, stages
from diffusekit.distill_losses import progressive_target, pseudo_huber
from diffusekit.errors import DiffusekitWarning, UserError
from diffusekit.files import read_tensors
from diffusekit.guidance import GuidedDenoiser
from diffusekit.io.checkpoint import latest_checkpoint
from diffusekit.nn.unet import UNet
from diffusekit.pipeline import Pipeline
from diffusekit.sigmas import ddim_step
from diffusekit.trainer import Trainer

FAST = ["train.threads=1", "train.log_every=1", "sample.n=4"]

# ----------------------------------------------------------------------------- the targets


def gaussian_denoiser(mu: float, var: float):
    """The exact x0_hat = E[x0 | x] of data N(mu, var) per pixel at noise sigma: mu + var / (var + sigma^2) (x - mu)."""

    def denoise(x, sigma, cond=None):
        s2 = sigma.double().reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return (mu + var / (var + s2) * (x.double() - mu)).to(x.dtype)

    return denoise


def test_progressive_target_is_the_x0_of_one_step_that_matches_two_teacher_ddim_steps():
    mu, var = 0.3, 0.25
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64) * 4
    sigma, mid, nxt = torch.tensor([4.0, 2.0, 1.0]).double(), torch.tensor([1.5, 1.0, 0.4]).double(), torch.tensor([0.5, 0.2, 0.0]).double()
    target = progressive_target(gaussian_denoiser(mu, var), x, sigma, mid, nxt)
    # closed form: a DDIM step of the exact denoiser is linear, x' - mu = (var + s s') / (var + s^2) (x - mu)
    c = lambda s, s_next: ((var + s * s_next) / (var + s**2)).view(-1, 1, 1, 1)  # noqa: E731
    two_steps = mu + c(mid, nxt) * c(sigma, mid) * (x - mu)
    ratio = (nxt / sigma).view(-1, 1, 1, 1)
    torch.testing.assert_close(target, (two_steps - ratio * x) / (1 - ratio), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ddim_step(x, target, sigma, nxt), two_steps, rtol=1e-12, atol=1e-12)  # one student step lands there
    assert (target - gaussian_denoiser(mu, var)(x, sigma)).abs().max() > 1e-2  # not simply the teacher's own x0_hat


def test_progressive_target_of_an_oracle_teacher_is_the_clean_image():
    """A teacher that knows x0 (conftest.TargetNet, through the real Denoiser) walks straight to it: x~ = x0."""
    schedule = tiny_schedule(prediction="v")
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    teacher = Denoiser(TargetNet(x0, schedule, "v"), schedule, "v")
    grid = schedule.sampling_sigmas(8, "trailing")
    x = x0 + grid[2] * torch.randn_like(x0)
    target = progressive_target(teacher, x, grid[2].expand(2), grid[3].expand(2), grid[4].expand(2))
    torch.testing.assert_close(target, x0, rtol=0, atol=1e-4)


def test_consistency_function_meets_its_boundary_condition():
    schedule = tiny_schedule()
    c_skip, c_out = boundary_scalings(torch.tensor([0.0, 1.0, 50.0]))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[1] < 3e-3 and c_out[2] > 0.9999
    f = ConsistencyDenoiser(lambda x, sigma, cond=None: torch.zeros_like(x), schedule)
    x = torch.randn(2, 1, 4, 4)
    alpha0 = 1 / (1 + schedule.sigma_min**2) ** 0.5
    torch.testing.assert_close(f(x, torch.tensor(schedule.sigma_min)), x * alpha0)  # f(x, sigma_min) = x_t: the network is not used


def test_pseudo_huber_is_l2_for_large_and_quadratic_for_small_differences():
    a = torch.zeros(2, 1, 10, 10)
    big, small = torch.full_like(a, 1.0), torch.full_like(a, 1e-4)
    c = 0.00054 * 10
    torch.testing.assert_close(pseudo_huber(big, a), torch.full((2,), (100 + c**2) ** 0.5 - c))
    torch.testing.assert_close(pseudo_huber(small, a), torch.full((2,), 100 * 1e-8 / (2 * c)), rtol=1e-2, atol=0)


def test_guidance_with_a_scale_per_sample_is_guidance_with_each_scale():
    net = lambda x, sigma, cond: x * (1 + cond["class_labels"].view(-1, 1, 1, 1))  # noqa: E731
    x, sigma = torch.randn(3, 1, 2, 2), torch.tensor(1.0)
    cond, uncond = {"class_labels": torch.tensor([1.0, 2.0, 3.0])}, {"class_labels": torch.zeros(3)}
    scales = torch.tensor([1.0, 2.5, 4.0])
    together = GuidedDenoiser(net, uncond, scales)(x, sigma, cond)
    for i, w in enumerate(scales.tolist()):
        alone = GuidedDenoiser(net, {"class_labels": uncond["class_labels"][i : i + 1]}, w)(x[i : i + 1], sigma, {"class_labels": cond["class_labels"][i : i + 1]})
        torch.testing.assert_close(together[i : i + 1], alone)


# ----------------------------------------------------------------------------- the guidance embedding


def test_guidance_embedding_starts_at_zero_and_old_weights_still_load():
    torch.manual_seed(0)
    plain = UNet(1, 1, channels=(8, 16), attention_levels=(1,), attention_head_dim=8, norm_groups=4, num_classes=3).eval()
    guided = UNet(1, 1, channels=(8, 16), attention_levels=(1,), attention_head_dim=8, norm_groups=4, num_classes=3, guidance_embedding=16).eval()
    assert "time_embedding.cond_proj.weight" not in plain.state_dict()  # existing state dicts keep their keys
    guided.load_state_dict({**guided.state_dict(), **plain.state_dict()})
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(guided(x, t, labels, guidance=torch.tensor([3.0, 7.0])), plain(x, t, labels))
        guided.time_embedding.cond_proj.weight.normal_()
        assert not torch.allclose(guided(x, t, labels, guidance=torch.tensor([3.0, 7.0])), guided(x, t, labels, guidance=torch.tensor([1.0, 1.0])))


def test_guidance_embedding_is_lcms():
    diffusers = pytest.importorskip("diffusers")
    w = torch.tensor([1.0, 2.5, 8.0])
    net = UNet(1, 1, channels=(8, 16), attention_levels=(), mid_attention=False, norm_groups=4, guidance_embedding=32)
    theirs = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=32)  # LCM embeds w - 1
    torch.testing.assert_close(net.embed_guidance(w, torch.zeros(3, 1, 8, 8)), theirs, rtol=0, atol=1e-3)  # float32 sines of angles up to 7000


def test_a_guidance_embedding_unet_matches_diffusers_time_cond_proj_dim(tmp_path):
    """LCM's U-Net (UNet2DConditionModel with time_cond_proj_dim, called with the guidance embedding as timestep_cond)
    is diffusekit's U-Net with model.guidance_embedding, key for key, with the scale as its `guidance` input; export writes the key."""
    diffusers = pytest.importorskip("diffusers")
    from diffusekit.io.diffusers import unet_config, unet_fields

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=2, time_cond_proj_dim=32)
    for p in ref.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(tmp_path / "unet")
    assert unet_fields(json.loads((tmp_path / "unet" / "config.json").read_text()), "unet/config.json")["model.guidance_embedding"] == 32
    ours = UNet(4, 4, channels=(16, 32), attention_levels=(0,), norm_groups=8, cross_attention_dim=24, attention_heads=2, guidance_embedding=32)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx, w = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 24), torch.tensor([2.0, 8.0])
    embedding = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=32)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx, timestep_cond=embedding).sample
        assert (ours.eval()(x, t, context=ctx, guidance=w) - expected).abs().max() < 1e-4
    config = tiny_config(model__cross_attention_dim=384, text__encoder="minilm", model__guidance_embedding=32)
    assert unet_config(config)["time_cond_proj_dim"] == 32


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny unconditional teacher (12 steps on 16 random 8x8 images)."""
    root = tmp_path_factory.mktemp("teacher")
    write_images(root / "images", random_images(16, seed=2))
    train(tiny_config(data__path=str(root / "images"), train__max_steps=12, diffusion__prediction="v"), root / "run", progress=False)
    return root / "run"


def test_progressive_stages_halve_to_the_asked_steps_and_record_them(teacher, tmp_path):
    out = tmp_path / "pd"
    result = distill(teacher, out, method="progressive", steps=1, train_steps=6,
                     overrides=[*FAST, "distill.start_steps=8", "train.checkpoint_every=1", "train.keep_checkpoints=10"], progress=False)
    assert result.step == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["student_steps"] for r in records] == [4, 4, 2, 2, 1, 1]
    for ckpt in sorted((out / "checkpoints").glob("step_*")):
        saved = json.loads((ckpt / "config.json").read_text())
        step = int(ckpt.name[5:])
        assert saved["distill"]["trained_steps"] == saved["sample"]["steps"] == [4, 4, 2, 2, 1, 1][step - 1]
        assert saved["sample"]["sampler"] == "ddim" and saved["distill"]["teacher"] == str(latest_checkpoint(teacher))
    assert {p.name for p in result.checkpoint.iterdir()} >= {"teacher.safetensors", "ema.safetensors"}
    assert sorted(p.name for p in (out / "students").iterdir()) == ["2-steps", "4-steps"]  # the earlier stages' students, ready to sample
    for n, at_step in ((4, 2), (2, 4)):
        kept = Pipeline.from_pretrained(out / "students" / f"{n}-steps")
        saved = read_tensors(out / "checkpoints" / f"step_{at_step:08d}" / "ema.safetensors")
        assert kept.config.sample.steps == n and all(torch.equal(v, saved[k]) for k, v in kept.net.state_dict().items())
    # the last stage's teacher is the second stage's student (its EMA at the switch), not the original teacher
    second_stage = read_tensors(out / "checkpoints" / "step_00000004" / "ema.safetensors")
    assert all(torch.equal(v, second_stage[k]) for k, v in read_tensors(result.checkpoint / "teacher.safetensors").items())
    again = distill(teacher, out, method="progressive", steps=2, train_steps=2, overrides=[*FAST, "distill.start_steps=4"], overwrite=True, progress=False)
    assert again.step == 2 and not (out / "students").exists()  # --overwrite replaces all of it, the students too


def test_a_progressive_student_learns_its_teachers_two_steps(teacher, tmp_path):
    """A 1-step student of the 2-step teacher: after a few dozen steps its one DDIM step is much closer to the teacher's two."""
    out = tmp_path / "pd"
    distill(teacher, out, method="progressive", steps=1, train_steps=80,
            overrides=[*FAST, "distill.start_steps=2", "train.lr=3e-3", "train.ema_decay=0.8", "train.batch_size=16"], progress=False)
    noise = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    teacher_two = Pipeline.from_pretrained(teacher).sample(32, steps=2, sampler="ddim", spacing="trailing", noise=noise)
    student, start = Pipeline.from_pretrained(out), Pipeline.from_pretrained(teacher)
    assert (student.config.sample.sampler, student.config.sample.steps, student.config.sample.spacing) == ("ddim", 1, "trailing")
    after = (student.sample(32, noise=noise) - teacher_two).pow(2).mean()
    before = (start.sample(32, steps=1, sampler="ddim", spacing="trailing", noise=noise) - teacher_two).pow(2).mean()
    assert after < 0.25 * before, (after, before)


def truncated_copy(run, out, step: int):
    """A copy of a run as a kill after checkpoint `step` leaves it."""
    shutil.copytree(run, out)
    for ckpt in (out / "checkpoints").glob("step_*"):
        if int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    (out / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")


@pytest.mark.parametrize("method, split", [("progressive", 3), ("progressive", 4), ("consistency", 3)])
def test_a_distillation_resumes_bit_for_bit(teacher, tmp_path, method, split):
    """Killed mid-stage (3), at a stage switch (4), or a consistency run (target network, its EMA): resumed, it ends as the straight run did."""
    straight = distill(teacher, tmp_path / "straight", method=method, steps=1 if method == "progressive" else 2, train_steps=6,
                       overrides=[*FAST, "distill.start_steps=8", "distill.solver_steps=10", "train.checkpoint_every=1", "train.keep_checkpoints=10",
                                  "data.hflip=true"], progress=False)
    truncated_copy(tmp_path / "straight", tmp_path / "split", split)
    resumed = distill(None, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == straight.step == 6
    names = ["model", "ema", "teacher", "optimizer", "rng"] + (["target"] if method == "consistency" else [])
    for name in names:
        a, b = read_tensors(straight.checkpoint / f"{name}.safetensors"), read_tensors(resumed.checkpoint / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [[json.loads(line)["loss"] for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for r in (straight, resumed)]
    assert losses[0] == losses[1]


def test_a_consistency_student_samples_at_any_steps_with_its_defaults(teacher, tmp_path, capsys):
    out = tmp_path / "cd"
    distill(teacher, out, method="consistency", steps=4, train_steps=3, overrides=[*FAST, "distill.solver_steps=10"], progress=False)
    pipe = Pipeline.from_pretrained(out)
    assert isinstance(pipe.denoiser, ConsistencyDenoiser)
    assert (pipe.config.sample.sampler, pipe.config.sample.steps, pipe.config.eval.sampler) == ("consistency", 4, "consistency")
    calls = []
    pipe.net.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    for steps in (1, 2, 4):
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", DiffusekitWarning)  # its own schedule: no warning
            assert pipe.sample(3, steps=steps).shape == (3, 1, 8, 8)
        assert calls == [3] * steps
    with pytest.warns(DiffusekitWarning, match="consistency student samples with --sampler consistency") as caught:
        pipe.sample(2, steps=3, sampler="dpmpp_2m")
    assert len(caught) == 1  # once per call, not once per batch or step
    code, stdout, _ = cli(capsys, "info", out)
    assert code == 0 and "consistency distillation" in stdout and str(latest_checkpoint(teacher)) in stdout


def test_a_progressive_student_warns_when_sampled_off_its_schedule(teacher, tmp_path):
    out = tmp_path / "pd"
    distill(teacher, out, method="progressive", steps=2, train_steps=1, overrides=[*FAST, "distill.start_steps=4"], progress=False)
    pipe = Pipeline.from_pretrained(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiffusekitWarning)
        pipe.sample(2)
    for off in ({"steps": 4}, {"spacing": "leading"}, {"sampler": "dpmpp_2m"}, {"eta": 1.0}):
        with pytest.warns(DiffusekitWarning, match="distilled for DDIM at its 2 trailing timesteps"):
            pipe.sample(2, **off)


def test_guidance_distillation_of_a_class_conditional_teacher(tmp_path):
    """mnist digits (64 of them) at 8 px, 10 classes: the student gets the guidance embedding, the guided student is called once per
    step with the scale as an input, and after distillation that input matters."""
    sets = {"data__dataset": "mnist", "data__limit": 64, "model__num_classes": 10}
    train(tiny_config(train__max_steps=4, **sets), tmp_path / "teacher", progress=False)
    for method, steps in (("progressive", 2), ("consistency", 2)):
        out = tmp_path / method
        distill(tmp_path / "teacher", out, method=method, steps=steps, train_steps=8,
                overrides=[*FAST, "distill.start_steps=4", "distill.solver_steps=8", "train.lr=1e-2"], progress=False)
        pipe = Pipeline.from_pretrained(out)
        assert pipe.config.model.guidance_embedding > 0
        expected = ["guidance", "halve"] if method == "progressive" else ["consistency"]
        assert [s.kind for s in stages(pipe.config)] == expected
        calls = []
        pipe.net.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
        noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        at_3 = pipe.sample(4, labels=[1, 2, 3, 4], guidance=3.0, noise=noise)
        assert calls == [4] * steps  # one call per step for guided samples: no classifier-free guidance doubling
        at_1 = pipe.sample(4, labels=[1, 2, 3, 4], guidance=1.0, noise=noise)
        assert (at_3 - at_1).abs().max() > 1e-4
        assert pipe.net.time_embedding.cond_proj.weight.abs().max() > 0
        with pytest.raises(UserError, match="no negative prompt or guidance rescale"):
            pipe.sample(2, labels=[1], guidance=3.0, guidance_rescale=0.5)
        with pytest.warns(DiffusekitWarning, match="outside the scales 1 to 5"):
            pipe.sample(2, labels=[1], guidance=9.0)


def test_guided_consistency_distillation_of_a_latent_text_model(tmp_path, capsys):
    """A tiny autoencoder, a latent text-to-image teacher on two captions, its consistency student; generate from the CLI."""
    from diffusekit.autoencoder_training import train_vae

    left, right = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    left[:, :4], right[:, 4:] = 255, 255
    names = [f"{side}_{i}.png" for side in ("left", "right") for i in range(4)]
    write_images(tmp_path / "images", [left] * 4 + [right] * 4, names=names)
    (tmp_path / "images" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n.split("_")[0]}) + "\n" for n in names))
    vae = {"vae__channels": [8, 16], "vae__layers_per_block": 1, "vae__latent_channels": 2, "vae__norm_groups": 4}
    data = {"data__path": str(tmp_path / "images"), "data__channels": 3}
    train_vae(tiny_config(task="autoencoder", train__max_steps=2, **data, **vae), tmp_path / "vae", progress=False)
    text = {"model__cross_attention_dim": 384, "text__encoder": "minilm", "text__max_length": 8, "model__channels": [8, 16]}
    train(tiny_config(latent__vae=str(tmp_path / "vae"), train__max_steps=2, **data, **vae, **text), tmp_path / "ldm", progress=False)
    shutil.rmtree(tmp_path / "vae")  # the teacher's checkpoint carries its autoencoder; the student needs nothing else
    distill(tmp_path / "ldm", tmp_path / "lcm", method="consistency", steps=2, train_steps=2, overrides=[*FAST, "distill.solver_steps=8"], progress=False)
    assert (latest_checkpoint(tmp_path / "lcm") / "vae.safetensors").is_file()
    out = tmp_path / "gen.png"
    code, stdout, err = cli(capsys, "generate", "left", "right", "--model", tmp_path / "lcm", "--n", "2", "--out", out)
    assert code == 0 and out.is_file() and "warning" not in err, err
    assert_user_error(cli(capsys, "generate", "left", "--model", tmp_path / "lcm", "--n", "1", "--negative", "right", "--out", tmp_path / "neg.png"),
                      "no negative prompt")


# ----------------------------------------------------------------------------- bad input


def test_bad_distillation_inputs_are_one_clear_error(teacher, tmp_path, capsys):
    from diffusekit.autoencoder_training import train_vae

    write_images(tmp_path / "rgb", random_images(4, channels=3))
    vae = {"vae__channels": [8, 16], "vae__layers_per_block": 1, "vae__latent_channels": 2, "vae__norm_groups": 4}
    train_vae(tiny_config(task="autoencoder", train__max_steps=1, data__path=str(tmp_path / "rgb"), data__channels=3, **vae), tmp_path / "vae", progress=False)
    out = tmp_path / "student"
    capsys.readouterr()
    assert_user_error(cli(capsys, "distill", tmp_path / "vae", "--out", out), "autoencoder", "distill a diffusion run")
    assert_user_error(cli(capsys, "distill", teacher, "--steps", "3", "--out", out), "--steps 3", "power of two", "1, 2, 4, 8, 16, 32")
    assert_user_error(cli(capsys, "distill", teacher, "--steps", "64", "--out", out), "--steps 64", "power of two below 64")
    assert_user_error(cli(capsys, "distill", teacher, "--set", "distill.start_steps=128", "--out", out), "start_steps = 128", "100 timesteps")
    assert_user_error(cli(capsys, "distill", teacher, "--method", "consistency", "--steps", "80", "--out", out), "--steps 80", "distill.solver_steps")
    assert_user_error(cli(capsys, "distill", "--resume", "--out", out), "nothing to resume")
    assert not out.exists()
    code, _, _ = cli(capsys, "distill", teacher, "--method", "consistency", "--steps", "2", "--train-steps", "1", "--set", "distill.solver_steps=10",
                     "--set", "train.threads=1", "--quiet", "--out", out)
    assert code == 0
    assert_user_error(cli(capsys, "distill", out, "--out", tmp_path / "again"), "already a consistency student", "--resume")
    assert_user_error(cli(capsys, "distill", "--resume", "--method", "progressive", "--out", out), "distill.method", "in the run")


def test_distilling_with_a_budget_measures_the_steps_that_fit(teacher, tmp_path):
    result = distill(teacher, tmp_path / "pd", method="progressive", steps=2, budget="3s", overrides=[*FAST, "distill.start_steps=8"], progress=False)
    config = json.loads((tmp_path / "pd" / "config.json").read_text())
    per_stage = config["distill"]["stage_steps"]
    assert per_stage >= 1 and config["train"]["max_steps"] == 2 * per_stage and config["train"]["budget"] == "3s"
    assert result.step <= 2 * per_stage


def test_distill_trainer_needs_its_stage_steps(teacher, tmp_path):
    from diffusekit.distill import student_config, teacher_checkpoint

    ckpt, config = teacher_checkpoint(teacher)
    with pytest.raises(UserError, match="stage_steps"):
        Trainer(student_config(ckpt, config, "progressive", 2, 12), tmp_path / "x", DistillRecipe, progress=False)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_exported_students_sample_in_diffusers_as_in_diffusekit(teacher, tmp_path, capsys, method):
    """DDPMPipeline with the exported scheduler (DDIM, or LCMScheduler for a consistency student) draws the same images
    from the same seed: at 2 steps of T = 100 LCM's timesteps on the 10-point grid are diffusekit's trailing ones."""
    diffusers = pytest.importorskip("diffusers")
    from diffusekit.seeds import derive_seed

    distill(teacher, tmp_path / "student", method=method, steps=2, train_steps=2, overrides=[*FAST, "distill.start_steps=4", "distill.solver_steps=10"],
            progress=False)
    code, stdout, _ = cli(capsys, "export", tmp_path / "student", tmp_path / "hf")
    assert code == 0 and ("LCMScheduler takes its timesteps" in stdout if method == "consistency" else "num_inference_steps=2" in stdout)
    theirs = diffusers.DDPMPipeline.from_pretrained(tmp_path / "hf")
    assert type(theirs.scheduler).__name__ == ("LCMScheduler" if method == "consistency" else "DDIMScheduler")
    expected = theirs(batch_size=1, generator=torch.Generator().manual_seed(derive_seed(7, 0)), num_inference_steps=2, output_type="np").images
    assert theirs.scheduler.timesteps.tolist() == [99, 49]
    ours = Pipeline.from_pretrained(tmp_path / "student").sample(1, seed=7)
    assert ((ours + 1) / 2 - torch.from_numpy(expected).permute(0, 3, 1, 2)).abs().max() < 1e-4


def test_a_guidance_distilled_pixel_student_cannot_be_exported(tmp_path, capsys):
    train(tiny_config(data__dataset="mnist", data__limit=32, model__num_classes=10, train__max_steps=1), tmp_path / "teacher", progress=False)
    distill(tmp_path / "teacher", tmp_path / "student", steps=2, train_steps=2, overrides=[*FAST, "distill.start_steps=4"], progress=False)
    capsys.readouterr()
    assert_user_error(cli(capsys, "export", tmp_path / "student", tmp_path / "hf"), "guidance scale as an input", "UNet2DModel")
