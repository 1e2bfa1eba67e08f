"""The seed's concepts, each drawn from a model as one figure, with its equation and the code that computes it
(`diffusekit explain CONCEPT`; docs/concepts.md shows the figures of the shipped model).

    concept = CONCEPTS["forward"]
    figure, measured = concept.draw(pipe, ExplainSettings(frames=8))   # a PIL image and a line of what it measured
    concept.equation, concept.code                                      # plain text; "src/diffusekit/FILE.py: FUNCTION"

forward: x_t over t with the closed form's mean and std; reverse: x_t and the predicted x0 per step; loss: the
training loss by noise level, measured now; latent: image -> latent channels -> reconstruction; attention: where
each word lands (DAAM); steps: distance to a many-step sample against network calls, per sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffusekit.attention_maps import AttentionCollector, draw_attention
from diffusekit.conditioning import conditions
from diffusekit.errors import UserError
from diffusekit.figures import gray_rgb, image_rgb, line_chart, panel_rows, stack
from diffusekit.losses import diffusion_loss, x0_loss_weights
from diffusekit.metrics import psnr


@dataclass(frozen=True)
class ExplainSettings:
    """What a figure is made of; None: the model's own setting or the concept's default."""

    prompt: str | None = None  # a text model's prompt (default "red apple")
    label: int | None = None  # a class model's label
    image: torch.Tensor | None = None  # [1, C, H, W] in [-1, 1]: your image instead of one the model makes (forward, loss, latent)
    steps: int | None = None  # sampling steps of the images the model makes; `steps`: the most steps tried
    frames: int = 8  # columns of the forward and reverse figures
    levels: int = 24  # noise levels the loss is measured at
    n: int | None = None  # images: loss 8, steps 4, the others 1
    reference_steps: int = 100  # `steps`: the many-step sample the others are measured against
    seed: int = 0


@dataclass(frozen=True)
class Concept:
    title: str
    equation: str  # plain text, printed by the command
    code: tuple[str, ...]  # "src/diffusekit/FILE.py: FUNCTION" or "...: Class.method" (tests/test_explain.py checks each exists)
    draw: Callable  # (pipe, ExplainSettings) -> (PIL image, a line of what was measured)


def condition_of(pipe, s: ExplainSettings) -> dict:
    """The prompt or label images are made with: "red apple" for a text model unless told."""
    prompt = s.prompt if s.prompt is not None or pipe.text_encoder is None else "red apple"
    return {"prompts": prompt, "labels": None if s.label is None else [s.label]}


def source_images(pipe, s: ExplainSettings, n: int) -> torch.Tensor:
    """n images [n, C, H, W] in [-1, 1]: the given image repeated, or the model's own samples."""
    if s.image is not None:
        return s.image.expand(n, -1, -1, -1).float()
    return pipe.sample(n, steps=s.steps, seed=s.seed, batch_size=n, **condition_of(pipe, s))


def on_pixels(pipe, x: torch.Tensor) -> torch.Tensor:
    """What the network denoises, as images: a latent model's latents decoded."""
    return pipe.decode(x) if pipe.vae is not None else x.float().clamp(-1, 1).cpu()


def noise_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x)


@torch.no_grad()
def draw_forward(pipe, s: ExplainSettings):
    schedule, flow = pipe.schedule, pipe.schedule.process == "flow"
    x0 = source_images(pipe, s, 1)
    ts = torch.linspace(0, 1, s.frames, dtype=torch.float64) if flow else torch.linspace(0, schedule.num_timesteps - 1, s.frames).round().long()
    a, std = schedule.alpha_sigma(ts)
    x0s = x0.expand(len(ts), -1, -1, -1)
    eps = noise_like(x0s, s.seed)
    xt = schedule.q_sample(x0s, ts, eps)
    titles = [f"t={t:.2f}" if flow else f"t={int(t)}" for t in ts.tolist()]
    rows = [[(image_rgb(x), f"{title}\nmean {ai:.2f} x0\nstd {si:.2f}") for x, title, ai, si in zip(xt, titles, a.tolist(), std.tolist())]]
    if pipe.vae is not None:  # what a latent model really noises: its latents (shown decoded)
        z0 = pipe.encode(x0).expand(len(ts), -1, -1, -1)
        decoded = on_pixels(pipe, schedule.q_sample(z0, ts, noise_like(z0, s.seed)))
        rows.append([(image_rgb(x), f"{title}\nits latents\nnoised, decoded") for x, title in zip(decoded, titles)])
    grid = torch.linspace(0, 1, 101, dtype=torch.float64) if flow else torch.arange(schedule.num_timesteps)
    ga, gs = schedule.alpha_sigma(grid)
    names = ("1 - t (mean / x0)", "t (std)") if flow else ("sqrt(abar_t) (mean / x0)", "sqrt(1 - abar_t) (std)")
    chart = line_chart({names[0]: (grid.tolist(), ga.tolist()), names[1]: (grid.tolist(), gs.tolist())},
                       "the closed form's coefficients over t", "t", "coefficient")
    measured = (xt - a.float()[:, None, None, None] * x0s).flatten(1).std(1)  # the noise part, whose std the closed form says
    return stack([panel_rows(rows, side=72), chart]), ("std of x_t - mean at the frames: " + ", ".join(f"{v:.2f}" for v in measured.tolist())
                                                       + " (closed form: " + ", ".join(f"{v:.2f}" for v in std.tolist()) + ")")


@torch.no_grad()
def draw_reverse(pipe, s: ExplainSettings):
    states = []

    def keep(info) -> None:  # the first image's state after each step
        states.append({k: v[:1].clone() if torch.is_tensor(v) and v.ndim > 1 else v for k, v in info.items() if k in ("sigma", "sigma_next", "x", "denoised")})

    pipe.sample(1, steps=s.steps, sampler="ddim", seed=s.seed, callback=keep, **condition_of(pipe, s))
    chosen = sorted(set(torch.linspace(0, len(states) - 1, min(s.frames, len(states))).round().long().tolist()))
    t_of = lambda sigma: float(pipe.schedule.sigma_to_t(torch.as_tensor(sigma, dtype=torch.float64).reshape(1)))  # noqa: E731
    noisy, clean = [], []
    for i in chosen:
        state = states[i]
        alpha, _ = pipe.schedule.coefficients(torch.as_tensor(state["sigma_next"], dtype=torch.float64).reshape(1))
        x_t = on_pixels(pipe, state["x"] * alpha.float().to(state["x"]))[0]  # x on the process's own scale
        noisy.append((image_rgb(x_t), f"step {i + 1}/{len(states)}\nx_t, t={t_of(state['sigma_next']):.3g}"))
        clean.append((image_rgb(pipe.preview(state, 1)[0]), f"x0_hat\nat t={t_of(state['sigma']):.3g}"))
    return panel_rows([noisy, clean], side=72), f"{len(states)} DDIM steps; the last x_t is the image"


@torch.no_grad()
def draw_loss(pipe, s: ExplainSettings):
    d, n = pipe.config.diffusion, s.n or 8
    x0 = source_images(pipe, s, n)
    z0 = pipe.encode(x0) if pipe.vae is not None else x0.to(pipe.device)
    given = condition_of(pipe, s)
    cond, _ = conditions(pipe.config, pipe.text_encoder, pipe.device, n, given["labels"], given["prompts"])
    sigmas = pipe.schedule.sampling_sigmas(s.levels, "linspace")[:-1].flip(0)
    ts = pipe.schedule.sigma_to_t(sigmas).tolist()
    eps = noise_like(z0, s.seed)
    curves = {"weighted (what training minimises)": [], f"{d.prediction} MSE (uniform weights)": []}
    for sigma in sigmas:
        plain = float(diffusion_loss(pipe.net, pipe.schedule, z0, prediction=d.prediction, cond=cond, sigma=sigma.expand(n).to(pipe.device), noise=eps))
        # every image is at this one sigma, so the config's weighting scales the plain loss by one factor
        ratio = (x0_loss_weights(d.loss_weighting, d.prediction, sigma[None], pipe.schedule, d.snr_gamma)
                 / x0_loss_weights("uniform", d.prediction, sigma[None], pipe.schedule))
        curves["weighted (what training minimises)"].append(plain * float(ratio))
        curves[f"{d.prediction} MSE (uniform weights)"].append(plain)
    chart = line_chart({name: (ts, curve) for name, curve in curves.items()}, f"the loss by timestep ({n} images, {d.prediction} prediction)",
                       "t", "loss", log_y=True)
    weighted = curves["weighted (what training minimises)"]
    return chart, f"weighted loss {min(weighted):.3g} to {max(weighted):.3g} over t = {ts[0]:.3g} .. {ts[-1]:.3g}; mean {sum(weighted) / len(weighted):.3g}"


@torch.no_grad()
def draw_latent(pipe, s: ExplainSettings):
    if pipe.vae is None:
        raise UserError("this model works in pixel space: it has no autoencoder, so no latent space to show; `explain latent` needs a latent "
                        "model (the shipped emoji model: leave out --model; or a run of --preset emoji-ldm)")
    x0 = source_images(pipe, s, 1)
    z = pipe.encode(x0)
    back = pipe.decode(z)
    quality = float(psnr(back, x0.cpu()).mean())
    c, h, w = x0.shape[1:]
    row = [(image_rgb(x0[0]), f"image\n{c}x{h}x{w} = {c * h * w}")]
    row += [(gray_rgb(channel), f"latent ch {i}\n{z.shape[2]}x{z.shape[3]}") for i, channel in enumerate(z[0].cpu())]
    row.append((image_rgb(back[0]), f"decoded\nPSNR {quality:.1f} dB"))
    pixels, latents = c * h * w, z[0].numel()
    return panel_rows([row], side=72), f"{pixels} pixel values -> {latents} latent values ({pixels / latents:.0f}x fewer); reconstruction PSNR {quality:.1f} dB"


@torch.no_grad()
def draw_attention_concept(pipe, s: ExplainSettings):
    given = condition_of(pipe, s)
    collector = AttentionCollector(pipe, given["prompts"])
    images = pipe.sample(s.n or 1, steps=s.steps, seed=s.seed, attention=collector, **given)
    maps = collector.result()
    pairs = [f"{maps.tokens[i]!r}/{maps.tokens[j]!r} {maps.correlation(i, j):.2f}" for i in range(len(maps.tokens)) for j in range(i + 1, len(maps.tokens))]
    return draw_attention(images, maps), "correlation of the maps: " + (", ".join(pairs[:6]) or "one token only")


@torch.no_grad()
def draw_steps(pipe, s: ExplainSettings):
    n, most = s.n or 4, s.steps or 32
    samplers = ("consistency",) if pipe.config.distill.method == "consistency" else ("ddim", "dpmpp_2m", "unipc", "heun")
    calls = [0]
    hook = pipe.net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        def run(sampler: str, steps: int) -> tuple[int, torch.Tensor]:
            calls[0] = 0
            images = pipe.sample(n, steps=steps, sampler=sampler, seed=s.seed, batch_size=n, **condition_of(pipe, s))
            return calls[0], images

        _, reference = run(samplers[-1], s.reference_steps)
        grid = [2**k for k in range(most.bit_length()) if 2**k <= most]
        curves = {}
        for sampler in samplers:
            points = [run(sampler, steps) for steps in grid]
            curves[sampler] = ([c for c, _ in points], [float((images - reference).pow(2).mean().sqrt()) for _, images in points])
    finally:
        hook.remove()
    chart = line_chart(curves, f"distance to a {s.reference_steps}-step {samplers[-1]} sample ({n} images)", "network calls", "RMS distance",
                       log_x=True, log_y=True)
    return chart, "; ".join(f"{name}: {xs[-1]} calls, distance {ys[-1]:.3f}" for name, (xs, ys) in curves.items())


CONCEPTS = {
    "forward": Concept(
        "the forward process: noise added in closed form",
        "x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps, eps ~ N(0, I), abar_t = prod_{s<=t} (1 - beta_s)   (DDPM eq. 4)\n"
        "mean sqrt(abar_t) * x0, standard deviation sqrt(1 - abar_t); flow matching: x_t = (1 - t) * x0 + t * eps",
        ("src/diffusekit/schedule.py: NoiseSchedule.q_sample", "src/diffusekit/schedule.py: NoiseSchedule.alpha_sigma",
         "src/diffusekit/flow.py: FlowSchedule.q_sample"),
        draw_forward),
    "reverse": Concept(
        "the reverse process: denoise step by step",
        "x0_hat = D(x_t, sigma_t): the network's eps, v or x0 prediction turned into the clean image\n"
        "x_s = x0_hat + (sigma_s / sigma_t) * (x_t - x0_hat)   (DDIM, eta = 0; sigma = sqrt((1 - abar) / abar), x = x_t / sqrt(abar))",
        ("src/diffusekit/denoiser.py: Denoiser.__call__", "src/diffusekit/denoiser.py: x0_from_prediction",
         "src/diffusekit/sigmas.py: ddim_step", "src/diffusekit/samplers.py: sample_ddim"),
        draw_reverse),
    "loss": Concept(
        "the training loss, by noise level",
        "L = lambda(sigma) * || D(x0 + sigma * eps, sigma) - x0 ||^2, sigma and eps drawn per image\n"
        "= w(t) * || eps - eps_theta(x_t, t) ||^2 for an eps model (DDPM's simple loss with w = 1); lambda: min-SNR weights",
        ("src/diffusekit/losses.py: diffusion_loss", "src/diffusekit/losses.py: x0_loss_weights", "src/diffusekit/losses.py: loss_weights"),
        draw_loss),
    "latent": Concept(
        "latent space: diffusion on the autoencoder's small latents",
        "z = (E(x) - shift) * scale   (the encoder's posterior mean);   x_rec = Dec(z / scale + shift)\n"
        "the diffusion process and the network run on z, which holds far fewer values than x",
        ("src/diffusekit/pipeline.py: Pipeline.encode", "src/diffusekit/pipeline.py: Pipeline.decode",
         "src/diffusekit/nn/vae.py: AutoencoderKL.encode", "src/diffusekit/nn/vae.py: AutoencoderKL.scale_latents"),
        draw_latent),
    "attention": Concept(
        "cross-attention: where each word of the prompt lands",
        "P = softmax(Q K^T / sqrt(d)), Q from the image's pixels, K from the prompt's token embeddings\n"
        "map(token) = sum over layers, heads and steps of upsample(P[:, token])   (DAAM, Tang et al. 2023)",
        ("src/diffusekit/nn/attention_recorder.py: attention_probabilities", "src/diffusekit/nn/attention_recorder.py: CrossAttentionRecorder.record",
         "src/diffusekit/nn/blocks.py: Attention.attend", "src/diffusekit/attention_maps.py: AttentionCollector.recording"),
        draw_attention_concept),
    "steps": Concept(
        "why sampling is slow: steps against quality",
        "each step calls the network once (Heun: twice); a sampler of order p leaves an error ~ (1 / steps)^p\n"
        "DDIM (Euler's step in sigma): p = 1; DPM-Solver++(2M), UniPC, Heun: p = 2; measured: RMS distance to a many-step Heun sample",
        ("src/diffusekit/samplers.py: sample_ddim", "src/diffusekit/samplers.py: sample_dpmpp_2m", "src/diffusekit/samplers.py: sample_unipc",
         "src/diffusekit/samplers.py: sample_heun"),
        draw_steps),
}


def concept_named(name: str) -> Concept:
    if name not in CONCEPTS:
        raise UserError(f"unknown concept {name!r}; the concepts are: {', '.join(CONCEPTS)}")
    return CONCEPTS[name]
