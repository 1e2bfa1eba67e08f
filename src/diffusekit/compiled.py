"""torch.compile for a network, with a way back: where compilation fails, one warning and eager mode.

    net = compile_network(net)      # an nn.Module that calls the compiled graph (inductor)
    net.compile_seconds             # time of the calls that compiled (reported apart from the work)

The first call of each new input shape compiles (inductor generates C++ and builds it with the
machine's compiler, gcc here; minutes for a Stable Diffusion U-Net on a 2-core CPU, cached on disk
for later runs). If that fails (no compiler, an unsupported operation, a platform torch.compile does
not run on), the error is reported once as a warning and this and every later call run eagerly.
The wrapped network keeps its own parameter names (state_dict is the eager module's).
"""

from __future__ import annotations

import time

import torch

from diffusekit.errors import UserError, warn


class CompiledNetwork(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, mode: str | None = None):
        super().__init__()
        self.net = net
        self.compiled = torch.compile(net, mode=mode)
        self.failed = False
        self.compile_seconds = 0.0
        self.shapes_seen: set = set()

    def forward(self, *args, **kwargs):
        if self.failed:
            return self.net(*args, **kwargs)
        key = tuple(tuple(a.shape) for a in [*args, *kwargs.values()] if torch.is_tensor(a))
        start = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except UserError:
            raise
        except Exception as err:  # a compiler that cannot run here: say it once, go on eagerly
            self.failed = True
            warn(f"torch.compile could not compile the network ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                 "running it without compilation (eager), as fast as without --compile")
            return self.net(*args, **kwargs)
        if key not in self.shapes_seen:  # this call compiled a graph for a new shape
            self.shapes_seen.add(key)
            self.compile_seconds += time.perf_counter() - start
        return out

    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.net.load_state_dict(*args, **kwargs)


def compile_network(net: torch.nn.Module, mode: str | None = None) -> CompiledNetwork:
    return net if isinstance(net, CompiledNetwork) else CompiledNetwork(net, mode)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The eager network behind a compiled one (itself otherwise)."""
    return net.net if isinstance(net, CompiledNetwork) else net
