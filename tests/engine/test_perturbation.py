"""Ablation-CAM, Score-CAM and occlusion against slow references written from the formulas."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.engine.methods.perturbation import (
    ablation_cam,
    ablation_drops,
    occlusion,
    occlusion_grid,
    score_cam,
)
from camserve.errors import InvalidRequestError, UnknownNameError

DT = torch.float64


def close(got: Tensor, want: Tensor) -> None:
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class GapNet(nn.Module):
    """2 convs (16x16 -> 6 x 8x8 layer) + GAP + linear: the 000 sec. 3 setting."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.fc = nn.Linear(6, classes)

    def head(self, a: Tensor) -> Tensor:
        return self.fc(a.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class DeepHeadNet(GapNet):
    """A non-linear tail (conv + ReLU + flatten + linear) so Ablation-CAM is not CAM."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__(classes)
        self.conv = nn.Conv2d(6, 3, 3, padding=1)
        self.lin = nn.Linear(3 * 8 * 8, classes)

    def head(self, a: Tensor) -> Tensor:
        return self.lin(torch.relu(self.conv(a)).flatten(1))


def make(net_cls: type[GapNet], n: int = 2, seed: int = 0) -> tuple[GapNet, Tensor, Tensor, Tensor]:
    torch.manual_seed(seed)
    net = net_cls().to(DT).eval()
    images = torch.randn(n, 3, 16, 16, dtype=DT)
    with torch.no_grad():
        acts = net.body(images)
        targets = net(images).topk(3, dim=1).indices  # (N, K)
    return net, images, acts, targets


def tail_of(net: GapNet, targets: Tensor) -> Callable[[int, Tensor], Tensor]:
    def tail(i: int, acts: Tensor) -> Tensor:
        return net.head(acts)[:, targets[i]]

    return tail


def score_of(net: GapNet, targets: Tensor) -> Callable[[int, Tensor], Tensor]:
    def score(i: int, x: Tensor) -> Tensor:
        return net(x)[:, targets[i]]

    return score


# ------------------------------------------------------------------ Ablation-CAM


def ablation_reference(net: GapNet, acts: Tensor, targets: Tensor, form: str) -> Tensor:
    """One image, one target, one ablated channel at a time."""
    n, c, h, w = acts.shape
    out = torch.zeros(n, targets.shape[1], h, w, dtype=DT)
    with torch.no_grad():
        for i in range(n):
            for j, cls in enumerate(targets[i].tolist()):
                s = net.head(acts[i : i + 1])[0, cls].item()
                total = torch.zeros(h, w, dtype=DT)
                for k in range(c):
                    ablated = acts[i : i + 1].clone()
                    ablated[0, k] = 0.0
                    s_k = net.head(ablated)[0, cls].item()
                    den = s if form == "score" else acts[i, k].sum().item()
                    weight = (s - s_k) / den if abs(den) >= 1e-7 else 0.0
                    total += weight * acts[i, k]
                out[i, j] = torch.relu(total)
    return out


@pytest.mark.parametrize("form", ["score", "sum"])
@pytest.mark.parametrize("net_cls", [GapNet, DeepHeadNet])
def test_ablation_matches_reference(form: str, net_cls: type[GapNet]) -> None:
    net, _, acts, targets = make(net_cls)
    scores = net.head(acts).gather(1, targets).detach()
    got = ablation_cam(acts, scores, tail_of(net, targets), form=form, batch_size=4)
    assert got.shape == (2, 3, 8, 8) and got.dtype == DT
    close(got, ablation_reference(net, acts, targets, form))
    assert got.abs().sum() > 0


def test_ablation_batch_size_does_not_change_the_map() -> None:
    net, _, acts, targets = make(DeepHeadNet)
    scores = net.head(acts).gather(1, targets).detach()
    maps = [ablation_cam(acts, scores, tail_of(net, targets), batch_size=b) for b in (1, 4, 64)]
    close(maps[0], maps[1])
    close(maps[0], maps[2])


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_ablation_with_a_tail_that_writes_into_its_input(batch_size: int) -> None:
    """Regression: the ablated copies are one reused buffer; in-place tails must not corrupt it."""
    net, _, acts, targets = make(DeepHeadNet)
    scores = net.head(acts).gather(1, targets).detach()

    def inplace_tail(i: int, a: Tensor) -> Tensor:
        a.mul_(2.0)  # an in-place op right after the layer (nn.ReLU(inplace=True)-like)
        return net.head(a / 2.0)[:, targets[i]]

    got = ablation_cam(acts, scores, inplace_tail, batch_size=batch_size)
    close(got, ablation_reference(net, acts, targets, "score"))


def test_ablation_leaves_the_activations_untouched() -> None:
    net, _, acts, targets = make(DeepHeadNet)
    before = acts.clone()
    scores = net.head(acts).gather(1, targets).detach()
    ablation_cam(acts, scores, tail_of(net, targets), batch_size=4)
    assert torch.equal(acts, before)


def test_ablation_sum_form_is_cam_on_gap_net() -> None:
    """000 sec. 3: on GAP + linear, S - S_k = W_ck mean(A^k), so the /sum(A) form is CAM / Z."""
    net, _, acts, targets = make(GapNet, n=3)
    scores = net.head(acts).gather(1, targets).detach()
    got = ablation_cam(acts, scores, tail_of(net, targets), form="sum")
    weights = net.fc.weight.detach()[targets]  # (N, K, C)
    cam = torch.relu(torch.einsum("nkc,nchw->nkhw", weights, acts))
    z = acts.shape[2] * acts.shape[3]
    close(got * z, cam)


@pytest.mark.parametrize("net_cls", [GapNet, DeepHeadNet])
def test_ablation_drops_are_the_score_drops_of_zeroed_channels(net_cls: type[GapNet]) -> None:
    net, _, acts, targets = make(net_cls)
    scores = net.head(acts).gather(1, targets).detach()
    got = ablation_drops(acts, scores, tail_of(net, targets), batch_size=4)
    assert got.shape == (2, 6, 3) and got.dtype == DT
    with torch.no_grad():
        for i in range(2):
            for k in range(6):
                ablated = acts[i : i + 1].clone()
                ablated[0, k] = 0.0
                want = scores[i] - net.head(ablated)[0, targets[i]]
                close(got[i, k], want)
    if net_cls is GapNet:  # 000 sec. 3: on GAP + linear, S - S_k = W_ck mean(A^k)
        weights = net.fc.weight.detach()[targets]  # (N, K, C)
        close(got, (weights * acts.mean(dim=(2, 3))[:, None]).transpose(1, 2))


def test_ablation_tail_sees_at_most_batch_size_copies() -> None:
    net, _, acts, targets = make(GapNet)
    seen: list[int] = []
    base = tail_of(net, targets)

    def tail(i: int, a: Tensor) -> Tensor:
        seen.append(a.shape[0])
        return base(i, a)

    scores = net.head(acts).gather(1, targets).detach()
    ablation_cam(acts, scores, tail, batch_size=4)
    assert seen == [4, 2, 4, 2]  # 6 channels per image, 2 images


@pytest.mark.parametrize("form", ["score", "sum"])
def test_ablation_adversarial_inputs_stay_finite(form: str) -> None:
    net, _, acts, targets = make(DeepHeadNet)
    tail = tail_of(net, targets)
    zeros = torch.zeros_like(acts)
    out = ablation_cam(zeros, torch.zeros(2, 3, dtype=DT), tail, form=form)
    assert torch.isfinite(out).all() and (out == 0).all()
    huge = acts * 1e300
    out = ablation_cam(huge, net.head(huge).gather(1, targets).detach(), tail, form=form)
    assert torch.isfinite(out).all()
    neg = -acts - 1.0  # negative activations, channels summing to large negatives
    out = ablation_cam(neg, torch.full((2, 3), 1e-9, dtype=DT), tail, form=form)
    assert torch.isfinite(out).all()
    f32 = ablation_cam(
        acts.float() * 3e38, torch.ones(2, 3), lambda i, a: tail(i, a.double()).float()
    )
    assert f32.dtype == torch.float32 and torch.isfinite(f32).all()


def test_ablation_validates_arguments() -> None:
    net, _, acts, targets = make(GapNet)
    tail = tail_of(net, targets)
    scores = torch.ones(2, 3, dtype=DT)
    with pytest.raises(UnknownNameError, match=r"'mean'.*score, sum"):
        ablation_cam(acts, scores, tail, form="mean")
    with pytest.raises(InvalidRequestError, match=r"batch_size.*0"):
        ablation_cam(acts, scores, tail, batch_size=0)
    with pytest.raises(InvalidRequestError, match=r"scores.*\(2, K\).*\(3, 3\)"):
        ablation_cam(acts, torch.ones(3, 3), tail)
    with pytest.raises(InvalidRequestError, match=r"activations.*\(6, 8, 8\)"):
        ablation_cam(acts[0], scores, tail)
    with pytest.raises(InvalidRequestError, match=r"tail callable.*\(6, 3\).*\(6, 5\)"):
        ablation_cam(acts, scores, lambda i, a: net.head(a))


# ------------------------------------------------------------------ Score-CAM


def score_cam_reference(net: GapNet, images: Tensor, acts: Tensor, targets: Tensor) -> Tensor:
    """Wang et al. 2020 literally: C(A^k) = f(X * H^k) - f(black), softmax over k."""
    n, c, h, w = acts.shape
    out = torch.zeros(n, targets.shape[1], h, w, dtype=DT)
    with torch.no_grad():
        for i in range(n):
            for j, cls in enumerate(targets[i].tolist()):
                baseline = net(torch.zeros_like(images[i : i + 1]))[0, cls].item()
                contrib = []
                for k in range(c):
                    up = F.interpolate(acts[i : i + 1, k : k + 1], size=(16, 16), mode="bilinear")
                    lo, hi = up.min().item(), up.max().item()
                    hk = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
                    contrib.append(net(images[i : i + 1] * hk)[0, cls].item() - baseline)
                top = max(contrib)
                exps = [math.exp(v - top) for v in contrib]
                total = torch.zeros(h, w, dtype=DT)
                for k in range(c):
                    total += exps[k] / sum(exps) * acts[i, k]
                out[i, j] = torch.relu(total)
    return out


@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_score_cam_matches_reference(batch_size: int) -> None:
    net, images, acts, targets = make(DeepHeadNet)
    got = score_cam(images, acts, score_of(net, targets), batch_size=batch_size)
    assert got.shape == (2, 3, 8, 8)
    close(got, score_cam_reference(net, images, acts, targets))
    assert got.abs().sum() > 0


def test_score_cam_memory_is_bounded_by_batch_size() -> None:
    net, images, acts, targets = make(GapNet)
    seen: list[int] = []
    base = score_of(net, targets)

    def score(i: int, x: Tensor) -> Tensor:
        seen.append(x.shape[0])
        return base(i, x)

    score_cam(images, acts, score, batch_size=4)
    assert max(seen) <= 4 and sum(seen) == 2 * 6


def test_score_cam_adversarial_inputs_stay_finite() -> None:
    net, images, acts, targets = make(GapNet)
    score = score_of(net, targets)
    out = score_cam(torch.zeros_like(images), torch.zeros_like(acts), score)
    assert torch.isfinite(out).all() and (out == 0).all()
    const = torch.ones_like(acts)  # constant channels: masks are 0, weights uniform
    out = score_cam(images, const, score)
    close(out, torch.ones(2, 3, 8, 8, dtype=DT))
    out = score_cam(images * 1e300, acts * 1e300, lambda i, x: score(i, x) * 1e300)
    assert torch.isfinite(out).all()
    out = score_cam(images, -acts, lambda i, x: torch.full((x.shape[0], 3), math.inf, dtype=DT))
    assert torch.isfinite(out).all()


def test_score_cam_validates_arguments() -> None:
    net, images, acts, targets = make(GapNet)
    score = score_of(net, targets)
    with pytest.raises(InvalidRequestError, match=r"batch_size.*-1"):
        score_cam(images, acts, score, batch_size=-1)
    with pytest.raises(InvalidRequestError, match=r"batch 1 does not match images batch 2"):
        score_cam(images, acts[:1], score)
    with pytest.raises(InvalidRequestError, match=r"floating-point"):
        score_cam(images.long(), acts, score)


# ------------------------------------------------------------------ occlusion


def occlusion_reference(
    net: GapNet, images: Tensor, targets: Tensor, mask: int, stride: int, fill: float
) -> Tensor:
    """One image, one mask position at a time; pixels average the masks that cover them."""
    n, _, hh, ww = images.shape
    half = mask // 2

    def centres(size: int) -> list[int]:
        cs = list(range(0, size, stride))
        if cs[-1] - half + mask < size:  # last pixel uncovered: add a centre on it
            cs.append(size - 1)
        return cs

    out = torch.zeros(n, targets.shape[1], hh, ww, dtype=DT)
    with torch.no_grad():
        for i in range(n):
            base = net(images[i : i + 1])[0, targets[i]]
            total = torch.zeros(targets.shape[1], hh, ww, dtype=DT)
            count = torch.zeros(hh, ww, dtype=DT)
            for cy in centres(hh):
                for cx in centres(ww):
                    y0, y1 = max(0, cy - half), min(hh, cy - half + mask)
                    x0, x1 = max(0, cx - half), min(ww, cx - half + mask)
                    x = images[i : i + 1].clone()
                    x[..., y0:y1, x0:x1] = fill
                    delta = base - net(x)[0, targets[i]]
                    total[:, y0:y1, x0:x1] += delta.view(-1, 1, 1)
                    count[y0:y1, x0:x1] += 1
            out[i] = torch.where(count > 0, total / count.clamp(min=1), 0.0)
    return out


@pytest.mark.parametrize(
    ("mask", "stride", "fill", "batch_size"),
    [(5, 2, 0.0, 7), (4, 3, 0.5, 64), (35, 8, 0.0, 3), (3, 5, -1.0, 2), (1, 1, 0.0, 64)],
)
def test_occlusion_matches_reference(mask: int, stride: int, fill: float, batch_size: int) -> None:
    net, images, _, targets = make(DeepHeadNet)
    base = net(images).gather(1, targets).detach()
    got = occlusion(
        images,
        base,
        score_of(net, targets),
        mask=mask,
        stride=stride,
        fill=fill,
        batch_size=batch_size,
    )
    assert got.shape == (2, 3, 16, 16)
    ref = occlusion_reference(net, images, targets, mask, stride, fill)
    close(got, ref)
    assert got.abs().sum() > 0


def test_occlusion_grid_covers_the_border() -> None:
    assert occlusion_grid(10, 3, 4) == [(0, 2), (3, 6), (7, 10)]
    assert occlusion_grid(10, 2, 4) == [(0, 1), (3, 5), (7, 9), (8, 10)]
    assert occlusion_grid(4, 35, 8) == [(0, 4)]


def test_occlusion_of_a_linear_score_is_the_pixel_value() -> None:
    """score = sum of channel 0; a 1-px mask (fill 0) removes exactly that pixel's value."""
    images = torch.rand(1, 3, 6, 7, dtype=DT)

    def score(i: int, x: Tensor) -> Tensor:
        return x[:, 0].sum(dim=(1, 2)).unsqueeze(1)

    got = occlusion(images, score(0, images), score, mask=1, stride=1)
    close(got[0, 0], images[0, 0])


def test_occlusion_score_sees_at_most_batch_size_images() -> None:
    net, images, _, targets = make(GapNet, n=1)
    seen: list[int] = []
    base_fn = score_of(net, targets)

    def score(i: int, x: Tensor) -> Tensor:
        seen.append(x.shape[0])
        return base_fn(i, x)

    base = net(images).gather(1, targets).detach()
    occlusion(images, base, score, mask=4, stride=4, batch_size=5)
    assert max(seen) <= 5 and sum(seen) == 25  # 5 x 5 positions


def test_occlusion_adversarial_inputs_stay_finite() -> None:
    net, images, _, targets = make(GapNet)
    score = score_of(net, targets)
    zeros = torch.zeros_like(images)
    out = occlusion(zeros, net(zeros).gather(1, targets).detach(), score, mask=4, stride=4)
    assert torch.isfinite(out).all() and (out == 0).all()
    out = occlusion(images, torch.full((2, 3), math.inf, dtype=DT), score, mask=4, stride=4)
    assert torch.isfinite(out).all()


def test_occlusion_validates_arguments() -> None:
    net, images, _, targets = make(GapNet)
    score = score_of(net, targets)
    base = torch.zeros(2, 3, dtype=DT)
    with pytest.raises(InvalidRequestError, match=r"mask.*0"):
        occlusion(images, base, score, mask=0)
    with pytest.raises(InvalidRequestError, match=r"stride.*-2"):
        occlusion(images, base, score, stride=-2)
    with pytest.raises(InvalidRequestError, match=r"stride.*2.5"):
        occlusion(images, base, score, stride=2.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=r"fill.*nan"):
        occlusion(images, base, score, fill=math.nan)
    with pytest.raises(InvalidRequestError, match=r"base_scores.*\(2, K\).*\(2,\)"):
        occlusion(images, base[:, 0], score)
