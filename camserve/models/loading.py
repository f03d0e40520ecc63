"""Turning a :class:`ModelSpec` into a runnable model, and finding specs by name.

Sources: a factory (``package.module:function`` called with ``factory_kwargs``,
then the ``weights`` state dict loaded with ``weights_only=True``), a TorchScript
file, or a ``torch.export`` program (``.pt2``). Everything that can be checked is
checked at load time, with a :class:`~camserve.models.files.SpecError` naming
the field and the value.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from camserve.engine import Explainer, Explanation
from camserve.engine.targets import Targets
from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.models.files import SpecError, read_spec
from camserve.models.spec import ModelSpec

__all__ = [
    "BUILTIN_SPECS",
    "EOS",
    "PAD",
    "RUNTIMES",
    "UNK",
    "ExplainerFactory",
    "LayerExplainer",
    "LoadedModel",
    "RuntimeBinding",
    "load_model",
    "resolve",
    "word_tokenizer",
]

BUILTIN_SPECS = {"efficientnet_lite0": "camserve.models.efficientnet:efficientnet_lite0_spec"}
"""Built-in model name -> the function returning its spec (imported on first use)."""

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
_WORD = re.compile(r"[a-z0-9]+")

log = logging.getLogger(__name__)


class LayerExplainer(Protocol):
    """What serves explanations at one layer: the torch engine's
    :class:`~camserve.engine.Explainer`, or another runtime with its ``explain``.

    Attributes:
        layers: the explained layers (module paths).
        device: where the result tensors live.
    """

    @property
    def layers(self) -> tuple[str, ...]:
        """The explained layers (module paths)."""

    @property
    def device(self) -> torch.device:
        """Where the result tensors live."""

    def explain(
        self,
        inputs: Tensor | Sequence[Tensor],
        methods: str | Sequence[str] = ("gradcam",),
        targets: Targets = 1,
        score: str = "logit",
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Explanation:
        """Predictions and maps, as :meth:`camserve.engine.Explainer.explain`."""


ExplainerFactory = Callable[[Explainer | None], LayerExplainer]
"""Turns the torch engine's explainer of a layer into the one that serves the layer
(given None for a model served without a torch model, see :attr:`LoadedModel.layers`)."""

RUNTIMES = {"onnx": "camserve.export.serving:onnx_runtime"}
"""Runtime name (besides ``torch``) -> its plug-in ``module:function``, called with
``(spec, device)`` and returning a :class:`RuntimeBinding`. Imported on first
use, as a spec's factory is: the runtime's packages are an optional extra
(``camserve[onnx]``), and the runtime builds on this package, not the reverse.
"""


@dataclass(frozen=True)
class RuntimeBinding:
    """How a runtime other than torch serves a model.

    Attributes:
        runtime: its name (``onnx``).
        device: where it computes.
        provider: its execution provider (onnxruntime's), if any.
        explainer_factory: see :attr:`LoadedModel.explainer_factory`.
        model: for a spec without a torch model, the module that stands for it
            (predictions only; its forward runs the runtime), else None.
        layers: with ``model``, the layers the runtime explains.
    """

    runtime: str
    device: torch.device
    provider: str | None
    explainer_factory: ExplainerFactory
    model: nn.Module | None = None
    layers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to explain.

    Attributes:
        spec: its spec.
        model: the module, in eval mode, on ``device``.
        device: where it runs.
        generate: captioners: greedy decoding, images ``(N, 3, H, W)`` -> ids ``(N, L)``.
        eos_id: captioners: the id of ``<eos>``.
        pad_id: the id of ``<pad>`` (0 when the vocabulary has none).
        tokenize: VQA: question text -> token ids.
        runtime: ``torch``, or ``onnx`` (onnxruntime at the spec's layer).
        runtime_device: where the runtime computes (onnxruntime: its
            provider's device; torch: ``device``).
        provider: the onnxruntime execution provider (``CPUExecutionProvider``,
            ``CUDAExecutionProvider``), None for torch.
        explainer_factory: turns the torch engine's explainer of a layer into
            the one that serves it (runtime ``onnx``: a
            :class:`~camserve.export.FallbackExplainer` at the graph's layer,
            the torch engine at the others); None: the torch engine everywhere.
        layers: None when the torch model is loaded (every named module can be
            explained); for a spec without a torch model (an ONNX file alone),
            the layers its runtime explains, and :attr:`model` only predicts.
    """

    spec: ModelSpec
    model: nn.Module
    device: torch.device
    generate: Callable[[Tensor], Tensor] | None = None
    eos_id: int | None = None
    pad_id: int = 0
    tokenize: Callable[[str], list[int]] | None = None
    runtime: str = "torch"
    runtime_device: torch.device | None = None
    provider: str | None = None
    explainer_factory: ExplainerFactory | None = None
    layers: tuple[str, ...] | None = None


def word_tokenizer(vocab: tuple[str, ...]) -> Callable[[str], list[int]]:
    """Lower-cased words (letters and digits) -> ids; unknown words -> ``<unk>``.

    Raises (from the tokenizer):
        InvalidRequestError: an unknown word and no ``<unk>`` in the vocabulary.
    """
    ids = {w: i for i, w in enumerate(vocab)}
    unk = ids.get(UNK)

    def tokenize(text: str) -> list[int]:
        out = []
        for w in _WORD.findall(text.lower()):
            i = ids.get(w, unk)
            if i is None:
                raise InvalidRequestError(f"word {w!r} is not in the vocabulary")
            out.append(i)
        return out

    return tokenize


def _call_factory(spec: ModelSpec) -> nn.Module:
    assert spec.factory is not None
    module_name, _, func_name = spec.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(
            "factory", spec.factory, f"cannot import {module_name!r}: {exc}", spec.origin
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SpecError(
            "factory", spec.factory, f"{module_name} has no callable {func_name!r}", spec.origin
        )
    try:
        model = func(**dict(spec.factory_kwargs))
    except TypeError as exc:
        raise SpecError("factory_kwargs", dict(spec.factory_kwargs), str(exc), spec.origin) from exc
    if not isinstance(model, nn.Module):
        raise SpecError(
            "factory",
            spec.factory,
            f"returned a {type(model).__name__}, not a torch.nn.Module",
            spec.origin,
        )
    if spec.weights is not None:
        try:
            state = torch.load(spec.weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SpecError(
                "weights", str(spec.weights), f"not a loadable state dict: {exc}", spec.origin
            ) from exc
        if not isinstance(state, dict):
            raise SpecError(
                "weights", str(spec.weights), "the file holds no state dict", spec.origin
            )
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise SpecError(
                "weights",
                str(spec.weights),
                f"does not fit the model: missing keys {missing[:10]}, "
                f"unexpected keys {unexpected[:10]}",
                spec.origin,
            )
        wrong = [
            f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
            for k, v in state.items()
            if isinstance(v, Tensor) and tuple(v.shape) != tuple(own[k].shape)
        ]
        if wrong:
            raise SpecError(
                "weights", str(spec.weights), f"shapes do not fit: {wrong[:5]}", spec.origin
            )
        model.load_state_dict(state)
    return model


def _load_program(spec: ModelSpec) -> nn.Module:
    assert spec.program is not None
    path = Path(spec.program)
    try:
        if path.suffix == ".pt2":
            exported: nn.Module = torch.export.load(str(path)).module()
            return exported
        module: nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(path), map_location="cpu"
        )
    except Exception as exc:
        raise SpecError(
            "program", str(path), f"not a TorchScript or torch.export file: {exc}", spec.origin
        ) from exc
    return module


def load_model(spec: ModelSpec, device: torch.device | str | None = None) -> LoadedModel:
    """Builds, loads and checks the model of ``spec`` (eval mode, on ``device``).

    Runtime ``onnx``: the torch model is loaded too when the spec has one (it
    answers what the graph cannot; without one, the graph alone predicts and
    explains, see :attr:`LoadedModel.layers`), and the ONNX file opens in an
    onnxruntime session (CPU, or CUDA for a CUDA ``device`` when onnxruntime-gpu
    is installed) whose explainer the returned
    :attr:`LoadedModel.explainer_factory` serves at the spec's layer.
    A log line names the runtime serving the model.

    Raises:
        SpecError: a factory that cannot be imported or called, weights that do
            not fit (the missing / unexpected keys are named), an unknown layer,
            a captioner without ``generate`` or ``<eos>``, a VQA model without a
            vocabulary; runtime ``onnx``: a missing file, a file that is not a
            camserve export, a graph of another layer than the spec's.
    """
    dev = torch.device(device if device is not None else "cpu")
    if spec.runtime != "torch" and spec.factory is None and spec.program is None:
        return _load_without_torch_model(spec, dev)
    loaded = _load_torch(spec, dev)
    if spec.runtime == "torch":
        log.info("model %s: torch engine on %s", spec.name, dev)
        return loaded
    binding = _runtime(spec, dev)
    log.info(
        "model %s: %s (%s, %s) at layer %s, the torch engine on %s for other "
        "methods and layers",
        spec.name,
        binding.runtime,
        binding.provider,
        binding.device,
        spec.layer,
        dev,
    )
    return replace(
        loaded,
        runtime=binding.runtime,
        runtime_device=binding.device,
        provider=binding.provider,
        explainer_factory=binding.explainer_factory,
    )


def _load_without_torch_model(spec: ModelSpec, dev: torch.device) -> LoadedModel:
    """A spec with a runtime file and no torch model: the runtime predicts and explains."""
    binding = _runtime(spec, dev)
    if binding.model is None or binding.layers is None:
        raise SpecError(
            "factory",
            None,
            f"runtime {spec.runtime!r} needs the torch model too (a factory or a program)",
            spec.origin,
        )
    log.info(
        "model %s: %s (%s, %s) alone at layer %s: no torch model, so only the methods "
        "its graph computes",
        spec.name,
        binding.runtime,
        binding.provider,
        binding.device,
        spec.layer,
    )
    return LoadedModel(
        spec,
        binding.model,
        binding.device,
        runtime=binding.runtime,
        runtime_device=binding.device,
        provider=binding.provider,
        explainer_factory=binding.explainer_factory,
        layers=binding.layers,
    )


def _runtime(spec: ModelSpec, dev: torch.device) -> RuntimeBinding:
    """The binding of a non-torch runtime, from its plug-in in :data:`RUNTIMES`."""
    target = RUNTIMES.get(spec.runtime)
    if target is None:
        raise SpecError("runtime", spec.runtime, f"valid runtimes: torch, {', '.join(RUNTIMES)}")
    module_name, _, func_name = target.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except ImportError as exc:
        raise SpecError(
            "runtime",
            spec.runtime,
            f"needs the {spec.runtime} extra (pip install 'camserve[{spec.runtime}]'): {exc}",
            spec.origin,
        ) from exc
    binding = func(spec, dev)
    if not isinstance(binding, RuntimeBinding):
        raise SpecError("runtime", spec.runtime, f"{target} gave no RuntimeBinding", spec.origin)
    return binding


def _load_torch(spec: ModelSpec, dev: torch.device) -> LoadedModel:
    """The torch model of ``spec`` (a factory or a program)."""
    if spec.factory is None and spec.program is None:
        raise SpecError(
            "factory",
            None,
            f"runtime {spec.runtime!r} needs the torch model too (a factory or a program): "
            "it answers what the ONNX graph cannot",
            spec.origin,
        )
    model = _call_factory(spec) if spec.factory is not None else _load_program(spec)
    layers = {name for name, _ in model.named_modules() if name}
    if spec.layer not in layers:
        shown = ", ".join(sorted(layers)[:30])
        raise SpecError("layer", spec.layer, f"no such module; modules: {shown}", spec.origin)
    model = model.to(dev)
    if spec.program is None or Path(spec.program).suffix != ".pt2":
        model = model.eval()  # a torch.export program is traced in eval mode and refuses eval()
    vocab = tuple(spec.vocab)
    pad_id = vocab.index(PAD) if PAD in vocab else 0
    if spec.kind == "captioner":
        generate = getattr(model, "generate", None)
        if not callable(generate):
            raise SpecError(
                "kind", spec.kind, "a captioner needs a generate(images) method", spec.origin
            )
        if EOS not in vocab:
            raise SpecError(
                "vocab", list(vocab)[:10], f"a captioner's vocabulary needs {EOS}", spec.origin
            )
        return LoadedModel(
            spec, model, dev, generate=generate, eos_id=vocab.index(EOS), pad_id=pad_id
        )
    if spec.kind == "vqa":
        return LoadedModel(spec, model, dev, pad_id=pad_id, tokenize=word_tokenizer(vocab))
    return LoadedModel(spec, model, dev)


def _builtin(name: str) -> ModelSpec:
    module_name, _, func = BUILTIN_SPECS[name].partition(":")
    spec = getattr(importlib.import_module(module_name), func)()
    if not isinstance(spec, ModelSpec):
        raise InvalidRequestError(f"built-in model {name!r} gave no ModelSpec")
    return spec


def resolve(name_or_path: str | Path, store: str | Path | None = None) -> ModelSpec:
    """The spec of a spec file, of a model in the store, or of a built-in model.

    Args:
        name_or_path: a spec file path (``.toml``/``.yaml``/``.yml``), a model
            name with a spec ``<store>/<name>.toml`` (or ``.yaml``), or a
            built-in name (:data:`BUILTIN_SPECS`).
        store: the model store folder (default ``./model_store``).

    Raises:
        UnknownNameError: none of these (the message lists the valid names).
        SpecError: the spec file is wrong.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.suffix.lower() in (".toml", ".yaml", ".yml") or path.is_file():
        return read_spec(path)
    folder = Path(store) if store is not None else Path("model_store")
    for suffix in (".toml", ".yaml", ".yml"):
        candidate = folder / f"{text}{suffix}"
        if candidate.is_file():
            return read_spec(candidate)
    if text in BUILTIN_SPECS:
        return _builtin(text)
    names = set(BUILTIN_SPECS)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.suffix.lower() in (".toml", ".yaml", ".yml"):
                names.add(p.stem)
    raise UnknownNameError("model", text, names)
