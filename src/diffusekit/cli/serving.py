"""`diffusekit serve`: the web page and the HTTP API (diffusekit.serve) on localhost, with uvicorn."""

from __future__ import annotations

import argparse
import errno
import socket
from pathlib import Path

from diffusekit.cli.options import add_lora_option, apply_loras, positive_int
from diffusekit.errors import UserError
from diffusekit.precision import PRECISIONS


def api_key(text: str) -> str:
    """--api-key: a key a header can carry (printable ASCII, no spaces at either end), never empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the key is empty, which would leave the API open to anyone; give a real key "
                                         "(e.g. --api-key \"$(openssl rand -hex 16)\") or leave the option out")
    if text != text.strip() or not (text.isascii() and text.isprintable()):
        raise argparse.ArgumentTypeError("a key is printable ASCII without spaces at either end (an HTTP header carries no others)")
    return text


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or a UserError naming the port: the check before any model loads or anything is printed."""
    sock = None
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait for TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        if sock is not None:
            sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use (another server?); choose another one with --port, "
                            f"e.g. --port {port + 1 if port < 65535 else 7860}") from None
        raise UserError(f"cannot listen on {host} port {port} ({err.strerror or err}); check --host and --port") from None
    return sock


def load_controlnets(pipes: dict, paths) -> None:
    """Each --controlnet into every served model it fits (its input channels, skips and cross-attention width); one that
    fits none of them is a UserError naming why."""
    for path in paths or []:
        fitted, refusal = [], None
        for model, pipe in pipes.items():
            try:
                fitted.append(f"{pipe.load_controlnet(path)} on {model}")
            except UserError as err:
                refusal = err
        if not fitted:
            raise UserError(f"--controlnet {path} fits none of the served models: {refusal}")
        print(f"ControlNet {', '.join(fitted)} from {path}", flush=True)


DEFAULT_OUTPUTS = "outputs"  # beside where `serve` runs, as AUTOMATIC1111 and ComfyUI keep theirs


def outputs_folder(args) -> Path | None:
    """Where the server saves its images: --outputs DIR (or the deprecated --save DIR), else outputs/ in the working
    folder; None with --no-save (in memory only)."""
    if args.no_save and args.outputs is not None:
        raise UserError("--no-save keeps images in memory only, --outputs names a folder to save them in; give one of the two")
    return None if args.no_save else Path(args.outputs or DEFAULT_OUTPUTS)


def _serve(args) -> None:
    import uvicorn

    from diffusekit.errors import warn
    from diffusekit.serve import LOOPBACK_HOSTS, Limits, Server, create_app, load_pipes
    from diffusekit.serve.gallery import Gallery

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a TCP port; use 1 to 65535 (e.g. 7860)")
    folder = outputs_folder(args)
    loopback = args.host in LOOPBACK_HOSTS or args.host.startswith("127.")
    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_n=args.max_n, max_steps=args.max_steps, max_size=args.max_size,
                    max_upload_bytes=args.max_upload_mb * 2**20)
    with listen(args.host, args.port) as sock:  # bound before the models load and anything is printed; uvicorn serves on it
        if not loopback and not args.api_key:
            warn(f"serving on {args.host} without --api-key: anyone who can reach this machine can use the server")
        pipes = load_pipes(args.model or [], device=args.device, dtype=args.precision)
        for pipe in pipes.values():  # every served model gets the --lora files, fused into its weights in memory
            apply_loras(pipe, args.lora)
        load_controlnets(pipes, args.controlnet)
        gallery = Gallery(args.gallery, folder)
        server = Server(pipes, limits, queue_size=args.queue, gallery=gallery, api_key=args.api_key)
        app = create_app(server, allowed_hosts=LOOPBACK_HOSTS + [args.host] if loopback else None)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {', '.join(pipes)} on http://{shown}:{args.port}/ (OpenAI API: /v1, AUTOMATIC1111 API: /sdapi/v1)", flush=True)
        if folder is None or gallery.outputs.problem is None:  # else a warning has said why they are not saved
            print(f"images are saved in {folder.absolute()}/ (a folder per day)" if folder else
                  f"images are kept in memory only (--no-save: the newest {args.gallery})", flush=True)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=2)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down and raises the signal again; a normal end (as uvicorn.run)
            pass


def register(sub) -> None:
    p = sub.add_parser("serve", help="a web page and HTTP APIs (native, OpenAI's and AUTOMATIC1111's) for your models, on localhost; "
                       "every image is saved under outputs/")
    p.add_argument("--model", action="append", help="a run, checkpoint or diffusers folder, or a Stable Diffusion single file (repeatable; default: the shipped emoji demo model)")
    add_lora_option(p)
    p.add_argument("--controlnet", action="append", metavar="RUN_OR_FOLDER",
                   help="a ControlNet (a diffusers ControlNet folder, a `train-controlnet` run or a ControlNet 1.x file), loaded into "
                        "every served model it fits; jobs steer with it through \"control\" (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only); "
                   "another one exposes the server, so give it an --api-key")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", type=api_key, help="require the header Authorization: Bearer KEY on the API (the page asks for it)")
    p.add_argument("--queue", type=positive_int, default=8, help="jobs that may wait per model; more get HTTP 429 with Retry-After")
    p.add_argument("--max-n", type=positive_int, default=8, help="images per request")
    p.add_argument("--max-steps", type=positive_int, default=100, help="sampling steps per request")
    p.add_argument("--max-size", type=int, default=0, help="image side in pixels (default 0: four times the model's own size)")
    p.add_argument("--max-prompt-chars", type=positive_int, default=1000)
    p.add_argument("--max-upload-mb", type=positive_int, default=8, help="the largest uploaded image (init image, mask or control image), encoded")
    p.add_argument("--outputs", metavar="DIR", help="where every image is saved, a PNG with its parameters in a folder per day "
                   f"(DIR/2026-12-04/...png; deleted ones go to DIR/trash/); the gallery shows what is there (default: {DEFAULT_OUTPUTS}/ "
                   "in the folder where serve runs)")
    p.add_argument("--save", metavar="DIR", dest="outputs", help="deprecated: the same as --outputs DIR")
    p.add_argument("--no-save", action="store_true", help="save nothing: keep images in memory only (the newest --gallery)")
    p.add_argument("--gallery", type=positive_int, default=256, help="images kept in memory when they are not saved (--no-save, or "
                   "while the outputs folder cannot be written); saved images are all in the gallery")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="the networks' number format (auto: bf16 where the CPU or GPU has it natively)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_serve)
