"""Numerical cross-check: camserve's maps against the peers' on the same model, input and targets.

Maps are compared at the layer's resolution (no upsampling, so no interpolation
differences), min-max normalised per map. pytorch-grad-cam always returns
normalised maps at the input size; asking it for the layer's own size makes its
resize an identity. torchcam and captum return raw maps, so their raw maps are
compared too (relative to the map's largest value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from engine_workloads import PGC_METHODS, TORCHCAM_METHODS, Setup

__all__ = ["Check", "cross_check"]


@dataclass
class Check:
    """Largest differences over the top-5 targets for one (method, peer) pair."""

    method: str
    peer: str
    norm_max_abs: float  # max |camserve - peer| of min-max normalised maps
    raw_max_rel: float | None  # max |camserve - peer| / max|camserve| of raw maps (if the peer's)


def _minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-map min-max over the last two dimensions (constant map -> zeros)."""
    flat = m.flatten(-2)
    lo = flat.min(-1, keepdim=True).values
    span = flat.max(-1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-30), torch.zeros_like(flat))
    return out.view_as(m)


def _compare(method: str, peer: str, ours_raw: torch.Tensor, theirs: torch.Tensor,
             theirs_is_raw: bool) -> Check:
    ours_raw = ours_raw.detach().float().cpu()
    theirs = theirs.detach().float().cpu().reshape(ours_raw.shape)
    norm = (_minmax(ours_raw) - _minmax(theirs)).abs().max().item()
    rel = None
    if theirs_is_raw:
        scale = ours_raw.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
        rel = ((ours_raw - theirs).abs() / scale).max().item()
    return Check(method, peer, norm, rel)


def _camserve_maps(s: Setup, methods: list[str]) -> dict[str, torch.Tensor]:
    from camserve.engine import Explainer

    res = Explainer(s.model, s.layer).explain(s.x1, methods=methods, targets=[s.top5])
    return {m: res.map(m)[0] for m in methods}  # (K, h, w) raw maps


def _pgc(s: Setup, ours: dict[str, torch.Tensor], ablation: Any) -> list[Check]:
    import numpy as np
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    h, w = ours["gradcam"].shape[-2:]
    checks = []
    for method, cls_name in PGC_METHODS.items():
        maps = []
        with getattr(pgc, cls_name)(model=s.model, target_layers=[s.module]) as cam:
            cam.get_target_width_height = lambda _t: (w, h)  # layer size: resize is an identity
            for c in s.top5:
                maps.append(cam(input_tensor=s.x1, targets=[ClassifierOutputTarget(c)])[0])
        checks.append(_compare(method, "pytorch-grad-cam", ours[method],
                               torch.from_numpy(np.stack(maps)), False))
    if ablation is not None and "ablationcam" in ours:
        checks.append(_compare("ablationcam (top-1)", "pytorch-grad-cam", ours["ablationcam"][:1],
                               torch.from_numpy(np.asarray(ablation)), False))
    return checks


def _torchcam(s: Setup, ours: dict[str, torch.Tensor]) -> list[Check]:
    import torchcam.methods as tcm

    checks = []
    for method, cls_name in TORCHCAM_METHODS.items():
        ext = getattr(tcm, cls_name)(s.model, s.layer)
        try:
            scores = s.model(s.x1)
            maps = []
            for i, c in enumerate(s.top5):
                last = i == len(s.top5) - 1
                maps.append(ext(class_idx=c, scores=scores, normalized=False,
                                retain_graph=not last)[0][0])
        finally:
            ext.remove_hooks()
        checks.append(_compare(method, "torchcam", ours[method], torch.stack(maps), True))
    return checks


def _captum(s: Setup, ours: dict[str, torch.Tensor]) -> list[Check]:
    from captum.attr import LayerGradCam

    gc = LayerGradCam(s.model, s.module)
    maps = [gc.attribute(s.x1, target=c, relu_attributions=True)[0, 0] for c in s.top5]
    return [_compare("gradcam", "captum", ours["gradcam"], torch.stack(maps), True)]


def _gradcampp_formula(s: Setup, ours: dict[str, torch.Tensor]) -> list[Check]:
    """Grad-CAM++ from 002 eq. 9 in float64, pytorch-grad-cam's expression without its eps.

    pytorch-grad-cam adds 1e-6 to ``2 g^2 + sum(A) g^3``; with layer gradients
    of 1e-4..1e-3 (ResNets) that eps dominates the denominator and changes the
    alphas. This reference separates that from any error of camserve's.
    """
    store: dict[str, torch.Tensor] = {}
    handle = s.module.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
    try:
        out = s.model(s.x1)
    finally:
        handle.remove()
    acts = store["a"].detach().double()
    a_sum = acts.sum(dim=(2, 3), keepdim=True)
    maps = []
    for i, c in enumerate(s.top5):
        (g,) = torch.autograd.grad(out[0, c], store["a"], retain_graph=i < len(s.top5) - 1)
        g = g.double()
        alpha = torch.where(g != 0, g**2 / (2 * g**2 + a_sum * g**3), torch.zeros_like(g))
        weights = (alpha * g.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
        maps.append((weights * acts).sum(1).clamp(min=0)[0])
    return [_compare("gradcampp", "002 eq. 9, float64, no eps", ours["gradcampp"],
                     torch.stack(maps), True)]


def _pgc_ablation(s: Setup) -> Any:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    h, w = _camserve_maps(s, ["gradcam"])["gradcam"].shape[-2:]
    with pgc.AblationCAM(model=s.model, target_layers=[s.module]) as cam:
        cam.get_target_width_height = lambda _t: (w, h)
        return cam(input_tensor=s.x1, targets=[ClassifierOutputTarget(s.top5[0])])


def cross_check(s: Setup, peers: dict[str, str | None], with_ablation: bool) -> list[Check]:
    """Compare every method the installed peers share with camserve, on the top-5 targets."""
    methods = sorted(set(PGC_METHODS) | set(TORCHCAM_METHODS) | {"ablationcam"})
    ours = _camserve_maps(s, methods)
    checks = _gradcampp_formula(s, ours)
    if peers.get("pytorch-grad-cam", "absent") is None:
        ablation = _pgc_ablation(s) if with_ablation else None
        checks += _pgc(s, ours, ablation)
    if peers.get("torchcam", "absent") is None:
        checks += _torchcam(s, ours)
    if peers.get("captum", "absent") is None:
        checks += _captum(s, ours)
    return checks
