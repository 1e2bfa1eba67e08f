"""`diffusekit explain CONCEPT`: one figure of a diffusion concept drawn from your model (or the shipped one), with
its equation and the file and function that compute it (explain.py; docs/concepts.md)."""

from __future__ import annotations

from pathlib import Path

from diffusekit.cli.options import positive_int, seed_value
from diffusekit.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_out(out: Path, overwrite: bool, image: str | None) -> None:
    """Before any work: an image file name, not a folder, not the input image, not an existing file unless --overwrite."""
    if out.is_dir() or out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--out '{out}' is {'a folder' if out.is_dir() else 'not an image file name'}; give a .png file name")
    if image is not None and out.resolve() == Path(image).resolve():
        raise UserError(f"--out '{out}' would be written over --image '{image}', which this command reads; give another --out")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out, or pass --overwrite to replace it")


def _explain(args) -> None:
    from diffusekit.explain import ExplainSettings, concept_named
    from diffusekit.images import atomic_save, image_tensor, open_image
    from diffusekit.models import default_model
    from diffusekit.pipeline import Pipeline

    concept = concept_named(args.concept)
    out = Path(args.out or f"explain_{args.concept}.png")
    check_out(out, args.overwrite, args.image)
    pipe = Pipeline.from_pretrained(args.model or default_model(), device=args.device)
    size, channels = pipe.config.data.image_size, pipe.config.data.channels
    image = image_tensor(open_image(Path(args.image), "--image"), size, channels) if args.image else None
    settings = ExplainSettings(prompt=args.prompt, label=args.label, image=image, steps=args.steps, frames=args.frames, levels=args.levels,
                               n=args.n, reference_steps=args.reference_steps, seed=args.seed)
    print(f"{args.concept}: {concept.title}\n")
    print("\n".join("  " + line for line in concept.equation.splitlines()))
    print("\ncomputed by:")
    print("\n".join(f"  {reference}" for reference in concept.code))
    figure, measured = concept.draw(pipe, settings)
    try:
        atomic_save(figure, out)
    except OSError as err:
        raise UserError(f"could not write the figure to '{out}' ({err}); free some space or choose another --out") from None
    print(f"\nmeasured on {pipe.name}: {measured}\nwrote {out}")


def register(sub) -> None:
    from diffusekit.explain import CONCEPTS

    p = sub.add_parser("explain", help=f"draw a concept from a model, with its equation and code: {', '.join(CONCEPTS)}")
    p.add_argument("concept", metavar="CONCEPT", help=f"one of: {', '.join(CONCEPTS)}")
    p.add_argument("--model", help="a run, checkpoint or diffusers folder (default: the shipped emoji demo model)")
    p.add_argument("--out", help="the figure, a .png (default: explain_CONCEPT.png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--prompt", help="a text model's prompt (default: \"red apple\")")
    p.add_argument("--label", type=int, help="a class-conditional model's label")
    p.add_argument("--image", help="forward, loss, latent: start from this image instead of one the model makes")
    p.add_argument("--steps", type=positive_int, help="sampling steps of the images the model makes (default: the model's); "
                   "for `steps`, the most steps tried (default 32)")
    p.add_argument("--frames", type=positive_int, default=8, help="forward, reverse: columns of the figure")
    p.add_argument("--levels", type=positive_int, default=24, help="loss: noise levels it is measured at")
    p.add_argument("--n", type=positive_int, help="images (loss: 8, steps: 4, the others: 1)")
    p.add_argument("--reference-steps", type=positive_int, default=100, help="steps: the many-step sample the others are measured against")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    p.set_defaults(func=_explain)
