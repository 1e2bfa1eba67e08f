"""`diffusekit info`, `export` and `slim`: what a checkpoint (or an image) is, and copies of it in other forms."""

from __future__ import annotations

import json
from pathlib import Path

from diffusekit.errors import UserError


def _image_info(args) -> None:
    """The parameters an image carries (the "parameters" text chunk, AUTOMATIC1111's layout)."""
    from diffusekit.images import read_parameters

    recorded = read_parameters(Path(args.checkpoint))
    if args.json:
        print(json.dumps(recorded, indent=2, ensure_ascii=False))
        return
    print(recorded["text"])


def _info(args) -> None:
    if args.checkpoint is not None and Path(args.checkpoint).is_file():  # an image, not a checkpoint folder
        return _image_info(args)
    from diffusekit.config import config_to_dict
    from diffusekit.files import read_json
    from diffusekit.io.checkpoint import check_intact, load_config, resolve_checkpoint
    from diffusekit.models import build_net, build_vae

    if args.system:
        return _system(args)
    if args.checkpoint is None:
        raise UserError("info needs a checkpoint (a run folder or checkpoints/step_* folder), an image diffusekit made (IMAGE.png), or --system for this machine")
    ckpt = resolve_checkpoint(args.checkpoint)
    check_intact(ckpt)
    config = load_config(ckpt)
    state = read_json(ckpt / "state.json", "training state")
    autoencoder = config.task == "autoencoder"
    params = sum(p.numel() for p in (build_vae(config) if autoencoder else build_net(config)).parameters())
    info = {
        "checkpoint": str(ckpt),
        "step": state.get("step"),
        "images_seen": state.get("images_seen"),
        "train_seconds": round(state.get("train_seconds", 0.0), 1),
        "parameters": params,
        "has_ema": (ckpt / "ema.safetensors").is_file(),
        "config": config_to_dict(config),
    }
    if config.task == "finetune":  # the checkpoint holds a LoRA of the base model
        from diffusekit.files import read_tensors

        info["lora_parameters"] = sum(v.numel() for v in read_tensors(ckpt / "ema.safetensors").values())
    if args.json:
        print(json.dumps(info, indent=2))
        return
    m, d, data, v = config.model, config.diffusion, config.data, config.vae
    print(f"checkpoint   {ckpt}")
    print(f"trained      {info['step']} steps, {info['images_seen']} images, {info['train_seconds']} s")
    vae_line = (f"KL autoencoder, widths {list(v.channels)}, {v.latent_channels} latent channels, "
                f"{v.downsample_factor}x smaller latents, latent scale {v.scale_factor:.4g}")
    if autoencoder:
        print(f"model        {vae_line}; {params / 1e6:.2f}M parameters")
        print(f"data         {data.dataset}{' ' + data.path if data.path else ''}, {data.channels} x {data.image_size} x {data.image_size}")
        return
    if config.task == "finetune":
        f = config.finetune
        print(f"lora         rank {f.rank}, alpha {f.alpha or f.rank:g} on {', '.join(f.targets)}{' and the text encoder' if f.text_encoder else ''}: "
              f"{info['lora_parameters']} parameters; base {f.base or 'the shipped demo model'} (fingerprint {f.base_fingerprint[:12]}), not in the run")
    if config.latent.vae:
        print(f"latent       {vae_line} (from {config.latent.vae})")
    conditioning = f"class-conditional ({m.num_classes})" if m.num_classes else "text-conditioned" if m.cross_attention_dim else "unconditional"
    if m.type == "dit":
        print(f"model        DiT {params / 1e6:.2f}M parameters; patch {m.patch_size}, width {m.hidden_size}, depth {m.depth}, "
              f"{m.num_heads} heads, {m.pos_embed} positions, {conditioning}")
    else:
        print(f"model        U-Net {params / 1e6:.2f}M parameters; widths {list(m.channels)}, {m.layers_per_block} resnet(s)/level, "
              f"attention at levels {list(m.attention_levels)}, {conditioning}")
    if d.process == "flow":
        target = "v (the velocity eps - x0)" if d.prediction == "v" else d.prediction
        print(f"diffusion    flow matching, T = {d.timesteps}, predicts {target}, {d.timestep_sampling} t, shift {d.shift:g}")
    else:
        print(f"diffusion    {d.schedule} schedule, T = {d.timesteps}, predicts {d.prediction}, {d.loss_weighting} loss weighting"
              + (", zero terminal SNR" if d.zero_terminal_snr else ""))
    print(f"data         {data.dataset}{' ' + data.path if data.path else ''}, {data.channels} x {data.image_size} x {data.image_size}")
    print(f"sampling     {config.sample.sampler}, {config.sample.steps} steps, {config.sample.spacing} spacing (defaults)")
    dc = config.distill
    if dc.method:
        trained = dc.trained_steps or dc.steps
        so_far = "" if trained == dc.steps else f", trained for {trained} so far"
        guided = f"; guidance scale {dc.guidance_min:g} to {dc.guidance_max:g} is an input (one call per step)" if m.guidance_embedding else ""
        print(f"distilled    {dc.method} distillation of {dc.teacher} (trained {dc.teacher_step} steps) to {dc.steps} step(s){so_far}{guided}")


def _system(args) -> None:
    from diffusekit.devices import use_all_cores
    from diffusekit.layout import LAYOUT_ENV, cached_choices, forced_layout
    from diffusekit.precision import system_summary

    use_all_cores()
    summary = system_summary() | {"layouts": cached_choices(), "layout_forced": forced_layout()}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    cpu, auto = summary["cpu"], summary["auto"]
    print(f"cpu          {cpu['model']}; {cpu['physical_cores']} physical / {cpu['logical_cores']} logical cores usable; torch uses {summary['threads']} threads")
    print(f"cpu flags    {', '.join(cpu['flags']) or 'none of interest'}; PyTorch kernels: {cpu['torch_capability']}")
    print(f"native bf16  {'yes' if cpu['native_bf16'] else 'no'}")
    print(f"auto on cpu  sampling in {auto['cpu']['inference']}, training in {auto['cpu']['training']} ({auto['cpu']['why']})")
    if summary["layout_forced"]:
        print(f"layout       {summary['layout_forced']} for every network ({LAYOUT_ENV} is set)")
    elif not summary["layouts"]:
        print("layout       none measured yet: each network's first use on this CPU times channels-last against contiguous")
    for choice in summary["layouts"]:
        times = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in choice["seconds"].items())
        print(f"layout       {choice['layout']} for {choice['network']} {choice['inputs']}, {choice['mode']}, {choice['threads']} (measured: {times})")
    for i, name in enumerate(summary["cuda"]):
        print(f"cuda:{i}       {name}")
    if "cuda" in auto:
        print(f"auto on cuda sampling in {auto['cuda']['inference']}, training in {auto['cuda']['training']}")
    print(f"compile      {'a C++ compiler for torch.compile: ' + summary['compiler'] if summary['compiler'] else 'no C++ compiler found: --compile falls back to eager'}")
    print(f"torch        {summary['torch']}")


def _export(args) -> None:
    from diffusekit.io.diffusers_export import export_diffusers
    from diffusekit.io.single_file_export import export_single_file

    if args.format == "single-file":
        if args.components:
            raise UserError("--components applies to --format diffusers; a single file holds the U-Net, VAE and text encoder together")
        for note in export_single_file(args.checkpoint, args.out, weights=args.weights):
            print(f"note: {note}")
        print(f"wrote a Stable Diffusion single file to {args.out}")
        return
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    for note in export_diffusers(args.checkpoint, args.out, components=components, weights=args.weights):
        print(f"note: {note}")
    print(f"wrote a diffusers folder to {args.out}")


def _slim(args) -> None:
    from diffusekit.io.checkpoint import write_sampling_checkpoint

    out = write_sampling_checkpoint(args.checkpoint, args.out, half=args.half)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote a sampling-only checkpoint to {out} ({size / 2**20:.1f} MiB)")


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint, print the parameters an image was made with, or (--system) this machine")
    p.add_argument("checkpoint", metavar="CKPT_OR_IMAGE", nargs="?")
    p.add_argument("--system", action="store_true", help="the CPU (and GPU) found, their native number formats, what --precision auto picks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)

    p = sub.add_parser("export", help="write a run as a diffusers folder (DDPMPipeline or Stable Diffusion layout) or a Stable Diffusion single file")
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT")
    p.add_argument("out", metavar="OUT", help="a new folder (diffusers) or a new .safetensors file (single-file)")
    p.add_argument("--format", choices=("diffusers", "single-file"), default="diffusers",
                   help="diffusers: a folder; single-file: one .safetensors in the original SD 1.x / 2.x layout (AUTOMATIC1111, ComfyUI)")
    p.add_argument("--components", help="write only these parts, e.g. unet,vae (of unet or transformer (a DiT), vae, text_encoder, scheduler), without model_index.json")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.set_defaults(func=_export)

    p = sub.add_parser("slim", help="copy a checkpoint with only what sampling needs (EMA weights, VAE, config)")
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT")
    p.add_argument("out", metavar="OUT", help="a folder")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the size)")
    p.set_defaults(func=_slim)
