"""torch.compile of the evaluation networks' forward pass, once per process, architecture and shape.

`compiled_forward(net, amp)` returns `forward(params, buffers, x) -> logits`: a torch.compile'd
`functional_call` of a parameter-less copy of `net`, with the bf16 autocast (amp="bf16") inside the
compiled region. Parameters and buffers are inputs of the graph, so every fresh network of the same
architecture reuses the compiled code: an evaluation compiles once per input shape (the full
training batch, the last partial one, the test batch) and a distillation that evaluates the same
set size every `eval_it` iterations compiles only at its first evaluation
(docs/algorithms.md#evaluation-speed). `dynamic=False`: one static graph per shape, as fast as
compiled code gets, since a process only ever sees a few shapes.

On the CPU, inductor builds C++ kernels: `resolve_compile("true", device)` without a C++ compiler
is a UserError; "auto" compiles where it can and falls back to eager, with one warning, when a
compilation fails.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

from utils.io import UserError

COMPILE_MODES = ("auto", "true", "false")
BACKEND = "inductor"
# Every architecture and shape is a cache entry of the one code object `forward` below; torch's
# default limit (8) would silently send a pool of models back to eager code.
RECOMPILE_LIMIT = 256

Forward = Callable[[dict, dict, Tensor], Tensor]
_FORWARDS: dict[tuple, Forward] = {}
_FAILED: set[tuple] = set()


def compiler_candidates() -> list[str]:
    """The C++ compilers torch.compile may use on the CPU: $CXX if set, else g++ and clang++."""
    return [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]


def cxx_compiler() -> str | None:
    """The first of `compiler_candidates` on PATH, or None."""
    return next((c for c in compiler_candidates() if shutil.which(c)), None)


def can_compile(device: torch.device) -> bool:
    if device.type == "cpu":
        return cxx_compiler() is not None
    return True


def resolve_compile(mode: str | bool, device: torch.device, what: str = "--compile") -> bool:
    """auto|true|false (or a bool) -> whether to compile on `device`; true where torch cannot
    compile is a UserError."""
    mode = {True: "true", False: "false"}.get(mode, mode)  # type: ignore[arg-type]
    if mode not in COMPILE_MODES:
        raise UserError(f"{what} {mode!r} is unknown: expected one of {', '.join(COMPILE_MODES)}")
    if mode == "true" and not can_compile(device):
        raise UserError(
            f"{what} true on the CPU needs a C++ compiler (g++ or clang++, or $CXX; none found): "
            f"install one (e.g. apt-get install g++) or use {what} false"
        )
    return mode == "true" or (mode == "auto" and can_compile(device))


def _architecture(net: nn.Module) -> tuple:
    """What a compiled graph depends on besides the input: the module tree and tensor shapes."""
    shapes = tuple((n, tuple(t.shape), t.dtype) for n, t in net.state_dict().items())
    return (type(net).__qualname__, repr(net), shapes)


def compiled_forward(
    net: nn.Module, amp: str, device: torch.device, *, backend: str | Callable | None = None,
    strict: bool = False,
) -> Forward:  # fmt: skip
    """The cached compiled `forward(params, buffers, x)` of `net`'s architecture (see the module
    docstring). strict=False: a failed compilation warns once and runs that architecture eagerly
    from then on; strict=True raises. backend: torch.compile's (None: BACKEND)."""
    backend = BACKEND if backend is None else backend
    key = (_architecture(net), net.training, amp, device.type, backend)
    if key not in _FORWARDS:
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
        )
        base = copy.deepcopy(net).to("meta")

        def forward(params: dict, buffers: dict, x: Tensor) -> Tensor:
            with _autocast(device, amp):
                return functional_call(base, (params, buffers), (x,))

        compiled = torch.compile(forward, backend=backend, dynamic=False)
        _FORWARDS[key] = _with_fallback(compiled, forward, key, strict)
    return _FORWARDS[key]


def _with_fallback(compiled: Forward, eager: Forward, key: tuple, strict: bool) -> Forward:
    def run(params: dict, buffers: dict, x: Tensor) -> Tensor:
        if key in _FAILED:
            return eager(params, buffers, x)
        try:
            return compiled(params, buffers, x)
        except Exception as exc:  # inductor raises many types; all mean "not compiled"
            if strict:
                raise
            _FAILED.add(key)
            warnings.warn(
                f"torch.compile failed for {key[0][0]} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); evaluating it eagerly",
                stacklevel=2,
            )
            return eager(params, buffers, x)

    return run


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def clear_cache() -> None:
    """Forget every compiled forward (tests)."""
    _FORWARDS.clear()
    _FAILED.clear()
    torch._dynamo.reset()
