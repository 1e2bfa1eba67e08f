"""Tiny models and a real uvicorn server for the tests of `diffusekit serve`."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch
from conftest import tiny_config

from diffusekit.models import build_net
from diffusekit.pipeline import Pipeline


class CharEncoder(torch.nn.Module):
    """A text encoder for tests: each of the first 4 characters picks a fixed random vector (plus a start token)."""

    dim = 8

    def __init__(self):
        super().__init__()
        self.table = torch.randn(128, self.dim, generator=torch.Generator().manual_seed(0))

    def encode(self, prompts: list[str]):
        hidden, mask = torch.zeros(len(prompts), 5, self.dim), torch.zeros(len(prompts), 5, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            codes = [ord(c) % 128 for c in prompt[:4]]
            hidden[row, 0], mask[row, 0] = 1.0, 1
            for k, code in enumerate(codes, 1):
                hidden[row, k], mask[row, k] = self.table[code], 1
        return hidden, mask

    def prompt_tokens(self, prompt: str) -> list[tuple[int, str]]:
        """(position in the encoded sequence, character) of the characters encode() reads (what attention maps are drawn for)."""
        return list(enumerate(prompt[:4], 1))


def tiny_pipe(text: bool = False, seed: int = 0) -> Pipeline:
    """An 8 x 8 grayscale pixel model (T = 100), untrained; with text=True conditioned on CharEncoder prompts."""
    sets = {"model__cross_attention_dim": 8, "text__encoder": "chars"} if text else {}
    config = tiny_config(**sets)
    torch.manual_seed(seed)
    return Pipeline(config, build_net(config), "cpu", text_encoder=CharEncoder() if text else None)


class Gate(torch.nn.Module):
    """Wraps a network so that every call waits until the test opens the gate (a job that runs as long as we like)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.open, self.entered = net, threading.Event(), threading.Event()

    def forward(self, x, t, **cond):
        self.entered.set()
        if not self.open.wait(30):
            raise TimeoutError("the test never opened the gate")
        return self.net(x, t, **cond)


def gated(pipe: Pipeline) -> Gate:
    gate = Gate(pipe.denoiser.net)
    pipe.denoiser.net = gate
    return gate


@contextlib.contextmanager
def running_server(app):
    """The app under a real uvicorn on a free loopback port: yields its base URL, stops it afterwards."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)
