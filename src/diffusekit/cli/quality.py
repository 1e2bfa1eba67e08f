"""`diffusekit eval`: sample quality (FD, KID, precision / recall, digit labels) of a model or an image folder."""

from __future__ import annotations

from pathlib import Path

from diffusekit.cli.options import add_speed_args, positive_int, seed_value
from diffusekit.errors import UserError
from diffusekit.samplers import SAMPLERS
from diffusekit.schedule import SPACINGS


def _eval(args) -> None:
    from diffusekit.evaluate import default_report_path, evaluate_checkpoint, evaluate_images, format_report, write_report

    if (args.checkpoint is None) == (args.images is None):
        raise UserError("eval takes either a run/checkpoint or --images DIR (not both)")
    weights = args.inception_weights
    if args.images:
        from diffusekit.data import to_float
        from diffusekit.data.folder import load_folder

        reference = args.ref or "mnist"
        size, channels = (28, 1) if reference == "mnist" else (args.size or 64, 3)
        images, _, _ = load_folder(args.images, size, channels)
        report = evaluate_images(to_float(images), reference, args.features, weights)
        out = Path(args.json or "eval.json")
    else:
        report = evaluate_checkpoint(
            args.checkpoint, n=args.n, sampler=args.sampler, steps=args.steps, spacing=args.spacing, seed=args.seed,
            guidance=args.guidance, reference=args.ref, features=args.features, weights=weights, device=args.device,
            precision=args.precision, compile=args.compile,
        )
        out = Path(args.json) if args.json else default_report_path(report)
    print(format_report(report))
    print(f"wrote {write_report(report, out)}")


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure sample quality (FD, KID, precision/recall, digit labels)")
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT", nargs="?")
    p.add_argument("--images", metavar="DIR", help="evaluate a folder of images instead of sampling")
    p.add_argument("--ref", help="reference set: mnist, emoji or an image folder (default: the run's training data)")
    p.add_argument("--features", choices=("mnist", "inception", "random"), help="feature network (default: mnist for digits, else random)")
    p.add_argument("--inception-weights", metavar="PATH", help="local Inception-v3 FID weights (or set DIFFUSEKIT_INCEPTION_WEIGHTS)")
    p.add_argument("--n", type=positive_int, default=2000, help="number of samples")
    p.add_argument("--sampler", choices=SAMPLERS, metavar="NAME", help=f"the sampler: {', '.join(SAMPLERS)} (default: the run's eval.sampler)")
    p.add_argument("--steps", type=positive_int, help="network evaluations (default: the run's eval.steps)")
    p.add_argument("--schedule", "--spacing", dest="spacing", choices=SPACINGS, metavar="NAME",
                   help=f"the step schedule: {', '.join(SPACINGS)} (default: the run's sample.spacing)")
    p.add_argument("--guidance", type=float, help="guidance scale for conditional models")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--size", type=positive_int, help="with --images and a folder reference: the size both are compared at (default 64)")
    add_speed_args(p)
    p.add_argument("--json", help="where to write the JSON report (default: RUN/eval/...)")
    p.set_defaults(func=_eval)
