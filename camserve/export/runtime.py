"""The onnxruntime explainer: predictions and gradient-family maps from one onnxruntime call.

:class:`OnnxExplainer` runs a graph written by
:func:`~camserve.export.exporter.export_onnx` and computes the maps with the
same pure method functions as the torch engine
(:mod:`camserve.engine.methods.gradient`), so the two agree to float32
rounding. It has the interface of :meth:`camserve.engine.Explainer.explain`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from camserve.engine import Explainer, Explanation
from camserve.engine._numerics import finite
from camserve.engine.methods import check_options, list_methods, method_spec
from camserve.engine.methods.gradient import gradcampp
from camserve.engine.targets import SCORES, Targets, resolve_targets
from camserve.engine.timing import Stopwatch
from camserve.errors import InvalidRequestError, UnknownNameError, UnsupportedMethodError
from camserve.export.exporter import PLAIN_GRADIENT_METHODS

__all__ = ["GRAPH_METHODS", "FallbackExplainer", "OnnxExplainer", "select_providers"]

log = logging.getLogger(__name__)

GRAPH_METHODS: tuple[str, ...] = (
    *PLAIN_GRADIENT_METHODS,
    "gradcampp",
)
"""Methods computed from the graph's activations and gradients (plus ``cam`` where exported)."""

_ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def select_providers(preference: str | None = None) -> list[str]:
    """onnxruntime execution providers in order of preference.

    Args:
        preference: ``"cuda"``, ``"cpu"`` or None (CUDA when the installed
            onnxruntime has it, that is ``onnxruntime-gpu``, else the CPU).

    Raises:
        UnknownNameError: another preference.
        InvalidRequestError: ``"cuda"`` without a CUDA-enabled onnxruntime.
    """
    import onnxruntime as ort

    if preference not in (None, "cuda", "cpu"):
        raise UnknownNameError("provider", preference, ("cuda", "cpu"))
    available = ort.get_available_providers()
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preference == "cuda":
        raise InvalidRequestError(
            "provider 'cuda' needs onnxruntime-gpu (pip install 'camserve[gpu]'); "
            f"this onnxruntime has {available}"
        )
    return ["CPUExecutionProvider"]


class OnnxExplainer:
    """Explains the predictions of an exported graph with onnxruntime.

    Example:
        >>> ex = OnnxExplainer("model_store/resnet_gap.onnx")  # doctest: +SKIP
        >>> res = ex.explain(images, methods=("gradcam", "gradcampp"), targets=5)  # doctest: +SKIP
        >>> res.map("gradcam").shape  # (N, 5, h, w)  # doctest: +SKIP
        >>> ex.provider, ex.device  # ('CPUExecutionProvider', device(type='cpu'))  # doctest: +SKIP

    Args:
        path: an ONNX file written by :func:`~camserve.export.export_onnx`.
        provider: ``"cuda"``, ``"cpu"`` or None (CUDA when onnxruntime-gpu
            finds a GPU, else the CPU); the choice is logged.
        threads: onnxruntime's intra-op threads (None: its default, all cores).
        spinning: let idle intra-op threads spin (onnxruntime's default); False
            makes them sleep, which helps when other processes share the cores.
        pad_id: right-pad integer further inputs (question tokens) that are
            shorter than the graph's fixed length with this id (None: the
            file's ``camserve.pad_id`` metadata, else refuse).

    Attributes:
        provider: the execution provider the session runs on
            (``"CUDAExecutionProvider"`` or ``"CPUExecutionProvider"``).
        device: where the result tensors live (``cuda`` when the session runs on
            CUDA and torch sees a GPU, else ``cpu``).
        layers: the explained layer, as a one-tuple (the torch engine's attribute).
        cam: whether the graph computes CAM maps.
        num_classes: classes of the output (class targets), else None.
        max_targets: the most targets per image the graph takes (None: any).

    Raises:
        InvalidRequestError: a file that is not a camserve export.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        provider: str | None = None,
        threads: int | None = None,
        pad_id: int | None = None,
        spinning: bool = True,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        if not spinning:  # onnxruntime's counterpart of OMP_WAIT_POLICY=PASSIVE
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=select_providers(provider)
        )
        meta = dict(self._session.get_modelmeta().custom_metadata_map)
        if meta.get("camserve.interface") != "1":
            raise InvalidRequestError(
                f"{self.path} is not a graph written by camserve's export_onnx "
                "(no camserve.interface metadata)"
            )
        self.metadata: dict[str, str] = meta
        self.layers: tuple[str, ...] = (meta["camserve.layer"],)
        self.classes = meta["camserve.targets"] == "classes"
        self.cam = meta.get("camserve.cam") == "1"
        max_targets = int(meta.get("camserve.max_targets", "0"))
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self._outputs = [o.name for o in self._session.get_outputs()]
        logits_shape = next(o.shape for o in self._session.get_outputs() if o.name == "logits")
        self.num_classes: int | None = (
            int(logits_shape[1])
            if self.classes and len(logits_shape) == 2 and isinstance(logits_shape[1], int)
            else None
        )
        if not self.classes:
            grads = next(o for o in self._session.get_outputs() if o.name == "gradients")
            max_targets = int(grads.shape[1]) if isinstance(grads.shape[1], int) else 0
        self.max_targets: int | None = max_targets or None
        pad_meta = meta.get("camserve.pad_id")
        self.pad_id = pad_id if pad_id is not None or pad_meta is None else int(pad_meta)
        self.provider: str = self._session.get_providers()[0]
        on_gpu = self.provider == "CUDAExecutionProvider" and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        log.info(
            "onnxruntime explainer for %s: provider %s, device %s",
            self.path.name,
            self.provider,
            self.device,
        )

    # ------------------------------------------------------------------ checks
    def supported_methods(self) -> list[str]:
        """The method ids this graph can compute."""
        return [*(["cam"] if self.cam else []), *GRAPH_METHODS]

    def _methods(self, methods: str | Sequence[str]) -> list[str]:
        ids = [methods] if isinstance(methods, str) else list(methods)
        if not ids:
            valid = ", ".join(self.supported_methods())
            raise InvalidRequestError(f"at least one method is needed; valid methods: {valid}")
        known = list_methods()
        for m in ids:
            if m not in known:
                raise UnknownNameError("method", m, known)
        supported = self.supported_methods()
        missing = [m for m in ids if m not in supported]
        if missing:
            why = (
                " (cam needs a global-average-pooling + linear head after the layer)"
                if "cam" in missing
                else ""
            )
            raise UnsupportedMethodError(
                f"the onnxruntime explainer cannot compute {', '.join(missing)}{why}; "
                f"it computes {', '.join(supported)}; the torch engine computes the others"
            )
        return list(dict.fromkeys(ids))

    def _feed(self, inputs: Tensor | Sequence[Tensor]) -> tuple[dict[str, Any], Tensor]:
        xs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        if not xs or not all(isinstance(x, Tensor) for x in xs):
            raise InvalidRequestError(
                "inputs must be a Tensor (N, C, H, W) or a tuple of tensors, "
                f"got {type(inputs).__name__}"
            )
        names = [n for n in self._inputs if n != "class_ids"]
        if len(xs) != len(names):
            raise InvalidRequestError(
                f"the graph takes {len(names)} inputs ({', '.join(names)}), got {len(xs)}"
            )
        x = xs[0]
        if x.dim() != 4 or not x.is_floating_point():
            raise InvalidRequestError(
                f"images must be a float tensor (N, C, H, W), got {tuple(x.shape)} {x.dtype}"
            )
        if x.shape[0] == 0:
            raise InvalidRequestError(f"empty batch: shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise InvalidRequestError("images contain NaN or inf")
        feed: dict[str, Any] = {}
        for name, t in zip(names, xs, strict=True):
            spec = self._inputs[name]
            arr = t.detach().cpu()
            if arr.dim() != len(spec.shape) or arr.shape[0] != x.shape[0]:
                raise InvalidRequestError(
                    f"input {name!r} must have {len(spec.shape)} dims and batch size "
                    f"{x.shape[0]}, got shape {tuple(arr.shape)}"
                )
            arr = self._pad(name, arr, spec.shape)
            for d, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
                if d > 0 and isinstance(want, int) and got != want:
                    raise InvalidRequestError(
                        f"input {name!r} must have size {want} in dim {d} (fixed in the "
                        f"graph), got shape {tuple(arr.shape)}"
                    )
            dtype = _ONNX_TO_NUMPY.get(spec.type)
            feed[name] = np.ascontiguousarray(arr.numpy().astype(dtype, copy=False))
        return feed, x

    def _pad(self, name: str, arr: Tensor, shape: Sequence[Any]) -> Tensor:
        if self.pad_id is None or arr.is_floating_point() or arr.dim() != 2:
            return arr
        want = shape[1]
        if isinstance(want, int) and arr.shape[1] < want:
            pad = torch.full((arr.shape[0], want - arr.shape[1]), self.pad_id, dtype=arr.dtype)
            return torch.cat([arr, pad], dim=1)
        return arr

    def _class_ids(self, targets: Targets, n: int) -> tuple[Tensor, int]:
        """``class_ids`` for the graph (negative: rank j) and the number K requested."""
        c = self.num_classes
        if callable(targets) and not isinstance(targets, Tensor):
            raise InvalidRequestError(
                "the onnxruntime explainer takes class targets (top-k or class ids); a score "
                "function must be traced into the graph at export (export_onnx(targets=fn))"
            )
        if not isinstance(targets, int | bool) and not callable(targets):
            arr = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets)
            if arr.ndim == 0 and np.issubdtype(arr.dtype, np.integer):
                targets = int(arr)  # a numpy integer or a 0-d array / tensor: top-k
        if isinstance(targets, int) and not isinstance(targets, bool):
            if c is not None and not 1 <= targets <= c:
                raise InvalidRequestError(
                    f"targets (top-k) must be in 1..{c} for a model with {c} classes, "
                    f"got {targets}"
                )
            ids = torch.full((n, targets), -1, dtype=torch.long)
        else:
            if c is None:
                raise InvalidRequestError("class ids need a graph with a known class count")
            target, _ = resolve_targets(
                targets, torch.zeros(n, c), n, "logit", torch.device("cpu")
            )
            ids = target.ids.long()
        k = int(ids.shape[1])
        if self.max_targets is not None:
            if k > self.max_targets:
                raise InvalidRequestError(
                    f"this graph explains at most {self.max_targets} targets per image, "
                    f"got {k}; export it again with targets={k}"
                )
            pad = torch.full((n, self.max_targets - k), -1, dtype=torch.long)
            ids = torch.cat([ids, pad], dim=1)
        return ids, k

    def logits(self, inputs: Tensor | Sequence[Tensor]) -> Tensor:
        """The graph's ``logits`` output for ``inputs``, float32 ``(N, C)``, without autograd.

        Raises:
            InvalidRequestError: bad shapes or dtypes, or a graph with a traced
                score function (its logits are not class scores).
        """
        if not self.classes:
            raise InvalidRequestError("this graph has a traced score function, not class logits")
        feed, images = self._feed(inputs)
        feed["class_ids"] = np.full((int(images.shape[0]), 1), -1, dtype=np.int64)
        (raw,) = self._session.run(["logits"], feed)
        return torch.from_numpy(np.asarray(raw, dtype=np.float32)).to(self.device)

    # --------------------------------------------------------------- explain
    def explain(
        self,
        inputs: Tensor | Sequence[Tensor],
        methods: str | Sequence[str] = ("gradcam",),
        targets: Targets = 1,
        score: str = "logit",
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Explanation:
        """Predict and explain ``targets`` with every method in ``methods``.

        The same arguments and result as :meth:`camserve.engine.Explainer.explain`;
        ``timings["forward"]`` is the onnxruntime call (forward and backward in
        one graph). Methods: :data:`GRAPH_METHODS` and ``cam`` where exported.

        Args:
            inputs: images ``(N, C, H, W)`` float32, or a tuple with the graph's
                further inputs (sharing dim 0).
            methods: method ids.
            targets: ``k`` (top-k) or per-image class ids ``(N, K)``; for a graph
                with a traced score function, ``k`` takes its first k scores.
            score: ``"logit"`` or ``"probability"`` (post-softmax, 002 footnote 1:
                the gradient of ``p_c`` is ``p_c (g_c - sum_j p_j g_j)``);
                ignored for a graph with a traced score function.
            options: method id -> keyword options (``{"gradcampp":
                {"normalize_alpha": True}}``).

        Raises:
            UnknownNameError: unknown method, option, score kind or class id.
            UnsupportedMethodError: a method the graph cannot compute (named).
            InvalidRequestError: bad shapes, dtypes, k, or option values.
        """
        watch = Stopwatch(self.device)
        with watch.stage("total"):
            requested = self._methods(methods)
            opts = check_options(options)
            if score not in SCORES:
                raise UnknownNameError("score", score, SCORES)
            feed, images = self._feed(inputs)
            n = int(images.shape[0])
            if self.classes:
                class_ids, k = self._class_ids(targets, n)
                feed["class_ids"] = class_ids.numpy()
            else:
                k = self._function_k(targets)
            in_graph = self._graph_maps(requested, score, opts)
            names = self._wanted(requested, score, in_graph)
            with watch.stage("forward"):
                raw = self._session.run(names, feed)
            got = {
                name: torch.from_numpy(np.asarray(v)).to(self.device)
                for name, v in zip(names, raw, strict=True)
            }
            result = self._maps(got, requested, in_graph, k, score, opts, images, watch)
        result.timings.update(watch.result())
        return result

    def _function_k(self, targets: Targets) -> int:
        kmax = self.max_targets or 0
        if isinstance(targets, bool) or not isinstance(targets, int) or not 1 <= targets <= kmax:
            raise InvalidRequestError(
                f"this graph explains the {kmax} scores of the score function traced at "
                f"export; targets must be an int k in 1..{kmax}, got {targets!r}"
            )
        return targets

    def _graph_maps(
        self, requested: list[str], score: str, opts: dict[str, dict[str, Any]]
    ) -> set[str]:
        """Requested methods whose maps the graph computed (``map.<id>``, target logits)."""
        if self.classes and score != "logit":
            return set()
        return {
            m
            for m in requested
            if f"map.{m}" in self._outputs and not (m == "gradcampp" and opts.get(m))
        }

    def _wanted(self, requested: list[str], score: str, in_graph: set[str]) -> list[str]:
        """The graph outputs this call needs."""
        names = ["logits", "target_ids"]
        if not self.classes:
            names.append("target_scores")
        if any(m not in in_graph and m != "cam" for m in requested):
            names += ["activations", "gradients"]
            if self.classes and score == "probability":
                names.append("expected_gradients")
        if "cam" in requested:
            names.append("cam")
        names += [f"map.{m}" for m in requested if m in in_graph]
        return names

    def _maps(
        self,
        got: dict[str, Tensor],
        requested: list[str],
        in_graph: set[str],
        k: int,
        score: str,
        opts: dict[str, dict[str, Any]],
        images: Tensor,
        watch: Stopwatch,
    ) -> Explanation:
        output = finite(got["logits"])
        acts = got.get("activations", output)
        grads = got["gradients"][:, :k] if "gradients" in got else output
        ids = got["target_ids"][:, :k].long()
        logit_grads: Tensor | None = None
        logits: Tensor | None = None
        probabilities: Tensor | None = None
        if self.classes:
            logits = output
            probabilities = finite(torch.softmax(logits.float(), dim=1))
            if score == "probability" and "gradients" in got:
                p = probabilities.gather(1, ids)
                logit_grads = grads
                grads = p[:, :, None, None, None] * (grads - got["expected_gradients"][:, None])
                target_scores = p
            elif score == "probability":
                target_scores = probabilities.gather(1, ids)
            else:
                target_scores = logits.gather(1, ids)
        else:
            target_scores = got["target_scores"][:, :k]
        layer = self.layers[0]
        maps: dict[str, Tensor] = {}
        stats: dict[str, dict[str, float]] = {}
        for m in requested:
            with watch.stage(f"method.{m}"):
                if m == "cam" or m in in_graph:
                    maps[m] = finite(got["cam" if m == "cam" else f"map.{m}"][:, :k].float())
                elif m == "gradcampp":
                    out, st = gradcampp(acts, grads, logit_grads, **opts.get(m, {}))
                    if st:
                        stats[f"gradcampp@{layer}"] = st
                        stats["gradcampp"] = st
                    maps[m] = finite(out)
                else:
                    maps[m] = finite(method_spec(m).function(acts, grads))
        return Explanation(
            output=output,
            logits=logits,
            probabilities=probabilities,
            target_ids=ids,
            target_scores=finite(target_scores.float()),
            maps={layer: maps},
            stats=stats,
            timings={"upsample": 0.0},
            layers=self.layers,
            methods=tuple(requested),
            input_size=(int(images.shape[2]), int(images.shape[3])),
        )

    def describe(self) -> dict[str, Any]:
        """Facts for a model description: path, layer, provider, device, methods."""
        return {
            "runtime": "onnx",
            "path": str(self.path),
            "layer": self.layers[0],
            "provider": self.provider,
            "device": str(self.device),
            "methods": self.supported_methods(),
            "max_targets": self.max_targets,
            "outputs": json.loads(self.metadata.get("camserve.outputs", "[]")),
        }


class FallbackExplainer:
    """onnxruntime where the graph can answer, else the torch engine; the choice is logged.

    A front door serving a model with runtime ``onnx`` uses this as its
    explainer: requests whose methods the graph computes (at its layer, with
    class targets that fit it) go to :class:`OnnxExplainer`; the others (guided
    methods, Ablation-CAM, Score-CAM, occlusion, IG, SHAP, score functions, more
    targets than a fixed-K graph takes) go to the torch :class:`Explainer`,
    with an INFO log line naming the reason. :meth:`runtime_for` tells which
    runtime a request will use (for a metric label) before it runs.

    Args:
        onnx: the onnxruntime explainer.
        torch_explainer: the torch engine's explainer of the same model and layer
            (None: requests the graph cannot answer raise as :class:`OnnxExplainer` does).
    """

    def __init__(self, onnx: OnnxExplainer, torch_explainer: Explainer | None) -> None:
        self.onnx = onnx
        self.torch = torch_explainer
        self.layers = onnx.layers
        self.device = onnx.device

    def fallback_reason(
        self, methods: str | Sequence[str], targets: Targets = 1
    ) -> str | None:
        """Why the torch engine must answer (None when onnxruntime can)."""
        ids = [methods] if isinstance(methods, str) else list(methods)
        missing = [m for m in ids if m not in self.onnx.supported_methods()]
        if missing:
            return f"methods {', '.join(missing)} are not in the ONNX graph"
        if callable(targets) and not isinstance(targets, Tensor):
            return "a score function is not in the ONNX graph"
        if self.onnx.max_targets is not None:
            if isinstance(targets, int):
                k = targets
            else:  # ids per image (N, K), or one image's flat list (K,)
                given = targets.cpu().numpy() if isinstance(targets, Tensor) else targets
                shape = np.asarray(given).shape
                k = int(shape[-1]) if shape else 1
            if k > self.onnx.max_targets:
                return f"{k} targets; the graph takes at most {self.onnx.max_targets}"
        return None

    def supported_methods(self) -> list[str]:
        """Every method id it answers: all of the engine's, or the graph's without torch."""
        return list_methods() if self.torch is not None else self.onnx.supported_methods()

    def runtime_for(self, methods: str | Sequence[str], targets: Targets = 1) -> str:
        """``"onnx"`` or ``"torch"``: the runtime that answers these methods and targets."""
        if self.torch is None:
            return "onnx"
        return "torch" if self.fallback_reason(methods, targets) is not None else "onnx"

    def explain(
        self,
        inputs: Tensor | Sequence[Tensor],
        methods: str | Sequence[str] = ("gradcam",),
        targets: Targets = 1,
        score: str = "logit",
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Explanation:
        """:meth:`OnnxExplainer.explain`, or the torch engine's when the graph cannot answer."""
        reason = self.fallback_reason(methods, targets) if self.torch is not None else None
        if reason is None or self.torch is None:
            return self.onnx.explain(inputs, methods, targets, score, options)
        log.info("%s: torch engine instead of onnxruntime: %s", self.onnx.path.name, reason)
        return self.torch.explain(inputs, methods, targets, score, options)
