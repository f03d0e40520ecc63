"""Per-call forward hooks that record layer activations in the calling thread only.

Hooks are registered on entry and removed in ``finally`` on exit; they act
only for the thread that created them, so concurrent calls on one model never
see each other's activations, and other callers of the model are untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from camserve.errors import InvalidRequestError

__all__ = ["LayerCapture", "ReplaceOutput"]

# Registration and removal mutate the module's hook dict; serialise them.
_REGISTRY_LOCK = threading.Lock()


def _check(name: str, output: Any) -> Tensor:
    if not isinstance(output, Tensor) or output.dim() < 3 or not output.is_floating_point():
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise InvalidRequestError(
            f"layer {name!r} must output a float tensor (N, C, h, w), (N, h, w, C) or tokens "
            f"(N, T, C), got {shape}; pick a convolutional or token layer (a module whose "
            "output is one tensor)"
        )
    return output


class LayerCapture:
    """Context manager recording the outputs of ``layers`` during one forward.

    With ``grad=True`` the first recorded output that is not already part of an
    autograd graph (the earliest requested layer in execution order, when the
    forward runs under :func:`torch.no_grad`) is replaced by a detached leaf
    that requires grad, and grad mode is switched on for the rest of the
    forward (grad mode is thread-local; the caller's ``no_grad`` restores it).
    So the backward runs only through the part of the network after the layer
    and never into parameters or earlier layers. Every hook returns a copy of
    the recorded tensor, so in-place ops after the layer (``nn.ReLU(inplace=True)``)
    leave the recorded activation (and a leaf's version counter) untouched.

    Attributes:
        acts: layer name -> recorded layer output (``(N, C, h, w)``, tokens, ...).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, grad: bool) -> None:
        self._modules = [(name, model.get_submodule(name)) for name in layers]
        self._grad = grad
        self._thread = threading.get_ident()
        self._handles: list[RemovableHandle] = []
        self.active = True
        self.acts: dict[str, Tensor] = {}

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self.active or threading.get_ident() != self._thread:
                return None
            out = _check(name, output)
            if name in self.acts:
                raise InvalidRequestError(
                    f"layer {name!r} runs more than once per forward; pick a module that runs once"
                )
            if not self._grad:
                self.acts[name] = out.detach().clone()
                return None
            if out.requires_grad:
                self.acts[name] = out
                return out.clone()
            torch.set_grad_enabled(True)
            leaf = out.detach().requires_grad_()
            self.acts[name] = leaf
            return leaf.clone()

        return hook

    def __enter__(self) -> LayerCapture:
        with _REGISTRY_LOCK:
            try:
                for name, module in self._modules:
                    self._handles.append(module.register_forward_hook(self._hook(name)))
            except BaseException:
                self._remove()
                raise
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.active = False
        with _REGISTRY_LOCK:
            self._remove()

    def missing(self) -> list[str]:
        """Requested layers that did not run in the forward."""
        return [name for name, _ in self._modules if name not in self.acts]


class ReplaceOutput:
    """Context manager replacing one module's output (calling thread only).

    Used by the fallback tail of re-running methods when the model cannot be
    split with ``torch.fx``: set :attr:`value` before each forward.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._thread = threading.get_ident()
        self._handle: RemovableHandle | None = None
        self.value: Tensor | None = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if threading.get_ident() != self._thread or self.value is None:
            return None
        return self.value.clone()

    def __enter__(self) -> ReplaceOutput:
        with _REGISTRY_LOCK:
            self._handle = self._module.register_forward_hook(self._hook)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with _REGISTRY_LOCK:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
