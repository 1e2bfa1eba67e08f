"""`diffusekit serve`: a local web studio and HTTP API over Pipelines (layer 5: it parses, checks and calls
pipeline.py; no diffusion logic here). app.py holds the routes, jobs.py the model workers, gallery.py the images
(outputs.py: the outputs folder they are saved in), requests.py the request bodies and limits (control_requests.py: a job's ControlNet controls, /api/annotate), inside.py the
inside view (the schedule, x_t previews, attention maps), static/ the page
(plain HTML, CSS and JS, nothing fetched).

    from diffusekit.serve import Server, create_app, load_pipes
    app = create_app(Server(load_pipes(["runs/emoji-ldm"]), Limits()))
"""

from __future__ import annotations

from diffusekit.serve.app import Server, create_app
from diffusekit.serve.requests import Limits

__all__ = ["Limits", "Server", "create_app", "load_pipes", "LOOPBACK_HOSTS"]

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]


def load_pipes(paths: list[str], device: str = "auto", dtype: str = "fp32") -> dict:
    """{name: Pipeline} for model folders (the shipped demo model when `paths` is empty); names are the folders'
    names, made unique with -2, -3, ... Requests name models by these names only, never by a path."""
    from diffusekit.models import default_model
    from diffusekit.pipeline import Pipeline

    pipes: dict = {}
    for path in paths or [default_model()]:
        pipe = Pipeline.from_pretrained(path, device=device, dtype=dtype)
        name, k = pipe.name, 2
        while name in pipes:
            name, k = f"{pipe.name}-{k}", k + 1
        pipes[name] = pipe
    return pipes
