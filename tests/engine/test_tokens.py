"""Token layers (ViT, DeiT, registers) and channels-last layers (Swin) against the formulas.

A small ViT built here gives ``(N, prefix + h*w, C)`` tokens; the reference
reshapes a plain hook's activation and gradient by hand and applies the
Grad-CAM formula (001 eq. 1-2); Ablation-CAM is checked by zeroing one
channel of the patch tokens at a time and re-running the model.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from camserve.engine import Explainer
from camserve.engine.layout import TokenGrid
from camserve.errors import InvalidRequestError
from tests.engine._nets import ref_grad, ref_map


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return t + self.mlp(self.norm2(t))


class TinyViT(nn.Module):
    """Patch embedding, ``prefix`` class/distillation/register tokens, two blocks, a head."""

    def __init__(self, prefix: int = 1, size: tuple[int, int] = (16, 16), dim: int = 12) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        grid = (size[0] // 4) * (size[1] // 4)
        self.prefix = nn.Parameter(torch.randn(1, prefix, dim))
        self.pos = nn.Parameter(0.1 * torch.randn(1, prefix + grid, dim))
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        t = self.blocks(t)
        return self.head(self.norm(t)[:, 0])


def grid_of(t: Tensor, prefix: int, h: int, w: int) -> Tensor:
    """``(N, prefix + h*w, C)`` -> ``(N, C, h, w)`` by hand."""
    return t[:, prefix:].reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)


def reference(
    model: nn.Module, layer: str, x: Tensor, ids: Tensor, prefix: int, hw: tuple[int, int]
) -> Tensor:
    out = torch.zeros(*ids.shape, *hw, dtype=torch.float64)
    for i in range(x.shape[0]):
        for j, c in enumerate(ids[i].tolist()):
            a, g, _ = ref_grad(model, layer, x[i : i + 1], lambda o, c=c: o[0, c])
            out[i, j] = ref_map("gradcam", grid_of(a, prefix, *hw)[0], grid_of(g, prefix, *hw)[0])
    return out


def close(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max()))), float(
        (a - b).abs().max()
    )


@pytest.mark.parametrize(
    ("prefix", "size"),
    [(1, (16, 16)), (2, (16, 16)), (5, (16, 16)), (0, (16, 16)), (1, (16, 24)), (1, (24, 12))],
)
def test_token_layers_are_reshaped_automatically(prefix: int, size: tuple[int, int]) -> None:
    model = TinyViT(prefix, size).double().eval()
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hw = (size[0] // 4, size[1] // 4)
    # after blocks.1 only the prefix tokens reach the head: its norm1 is the last useful layer
    for layer in ("blocks.0", "blocks.1.norm1"):
        res = Explainer(model, layer).explain(x, methods=["gradcam", "layercam"], targets=2)
        assert res.map("gradcam").shape == (2, 2, *hw)
        close(res.map("gradcam"), reference(model, layer, x, res.target_ids, prefix, hw))
        assert float(res.map("gradcam").abs().max()) > 0
        assert res.upsampled("gradcam").shape == (2, 2, *size)


def test_ablationcam_on_tokens_ablates_patch_channels_and_keeps_the_prefix() -> None:
    model = TinyViT(1).double().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = Explainer(model, "blocks.0", batch_size=5).explain(x, methods=["ablationcam"], targets=2)
    module = model.blocks[0]
    with torch.no_grad():
        store: list[Tensor] = []
        h = module.register_forward_hook(lambda m, a, o: store.append(o.clone()))
        base = model(x)
        h.remove()
        tokens = store[0]
        want = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
        for i in range(2):
            acts = grid_of(tokens[i : i + 1], 1, 4, 4)[0]
            for k in range(acts.shape[0]):
                ablated = tokens[i : i + 1].clone()
                ablated[0, 1:, k] = 0.0  # channel k of every patch token; the class token stays
                h = module.register_forward_hook(lambda m, a, o, v=ablated: v)
                s_k = model(x[i : i + 1])[0]
                h.remove()
                for j, c in enumerate(res.target_ids[i].tolist()):
                    s = float(base[i, c])
                    want[i, j] += (s - float(s_k[c])) / s * acts[k]
    close(res.map("ablationcam"), want.clamp(min=0))


def test_prefix_token_counts_beyond_the_detection_need_a_token_grid_or_a_reshape() -> None:
    # 17 prefix tokens + a 9 x 9 grid: no count of 0..16 prefix tokens leaves a square grid
    model = TinyViT(17, (36, 36)).double().eval()
    x = torch.rand(2, 3, 36, 36, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with pytest.raises(InvalidRequestError, match=r"tokens \(N, 98, 12\).*TokenGrid\(prefix="):
        Explainer(model, "blocks.0").explain(x)
    by_grid = Explainer(model, "blocks.0", layout=TokenGrid(prefix=17))
    res = by_grid.explain(x, methods=["gradcam"], targets=2)
    close(res.map("gradcam"), reference(model, "blocks.0", x, res.target_ids, 17, (9, 9)))
    assert float(res.map("gradcam").abs().max()) > 0

    def reshape(t: Tensor) -> Tensor:
        return t[:, 17:].reshape(t.shape[0], 9, 9, -1).permute(0, 3, 1, 2)

    by_fn = Explainer(model, "blocks.0", layout={"blocks.0": reshape})
    res_fn = by_fn.explain(x, methods=["gradcam", "ablationcam"], targets=res.target_ids)
    close(res_fn.map("gradcam"), res.map("gradcam"))
    res_grid = by_grid.explain(x, methods=["ablationcam"], targets=res.target_ids)
    close(res_fn.map("ablationcam"), res_grid.map("ablationcam"))
    assert float(res_fn.map("ablationcam").abs().max()) > 0
    with pytest.raises(InvalidRequestError, match="only select and rearrange"):
        Explainer(model, "blocks.0", layout=lambda t: reshape(t) * 2).explain(x)


class SwinLike(nn.Module):
    """Channels-last stages ``(N, h, w, C)`` as Swin implementations keep them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.embed = nn.Conv2d(3, 10, 4, stride=4)
        self.stage = nn.Sequential(
            nn.LayerNorm(10), nn.Linear(10, 10), nn.GELU(), nn.Linear(10, 16)
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).permute(0, 2, 3, 1)  # (N, h, w, C)
        t = self.stage(t)
        return self.head(t.mean(dim=(1, 2)))


@pytest.mark.parametrize(
    ("size", "layout"),
    [((32, 32), "auto"), ((32, 32), "channels_last"), ((16, 32), "channels_last")],
)
def test_channels_last_layers_are_recognised_and_explained(
    size: tuple[int, int], layout: str
) -> None:
    # (N, 8, 8, 16) on 32 x 32 can only be channels last; (N, 4, 8, 16) on 16 x 32 reads as
    # channels first too (8 x 16 has the input's aspect ratio), so it needs the explicit layout
    model = SwinLike().double().eval()
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = Explainer(model, "stage", layout=layout).explain(x, methods=["gradcam"], targets=2)  # type: ignore[arg-type]
    assert res.map("gradcam").shape == (2, 2, size[0] // 4, size[1] // 4)
    for i in range(2):
        for j, c in enumerate(res.target_ids[i].tolist()):
            a, g, _ = ref_grad(model, "stage", x[i : i + 1], lambda o, c=c: o[0, c])
            want = ref_map("gradcam", a[0].permute(2, 0, 1), g[0].permute(2, 0, 1))
            close(res.map("gradcam")[i, j], want)
    assert float(res.map("gradcam").abs().max()) > 0


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="unknown layout 'nhwc'"):
        Explainer(SwinLike(), "stage", layout="nhwc")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_token_layers_give_float32_maps_near_the_float64_ones(
    dtype: torch.dtype,
) -> None:
    model = TinyViT(1).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    want = Explainer(model.double(), "blocks.0").explain(
        x.double(), methods=["gradcam", "ablationcam"], targets=1
    )
    low = model.to(dtype)
    ex = Explainer(low, "blocks.0")
    res = ex.explain(x.to(dtype), methods=["gradcam", "ablationcam"], targets=want.target_ids)
    for m in ("gradcam", "ablationcam"):
        got = res.map(m)
        assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
        scale = float(want.map(m).abs().max())
        assert scale > 0
        assert float((got.double() - want.map(m)).abs().max()) < 0.15 * scale, m
