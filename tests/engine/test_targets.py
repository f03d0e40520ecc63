"""Targets: top-k, given ids, probabilities, and score functions with extra model inputs."""

from __future__ import annotations

import torch

from camserve.engine import Explainer
from tests.engine._nets import Vqa, ref_grad, ref_map, vgg_net


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    a, b = a.detach().double(), b.detach().double()
    assert torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max()))), float(
        (a - b).abs().max()
    )


def test_topk_ids_logits_probabilities() -> None:
    model = vgg_net()
    x = torch.randn(3, 3, 16, 16)
    res = Explainer(model, "features.3").explain(x, targets=3)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(res.target_ids, out.topk(3, dim=1).indices)
    close(res.logits, out)
    close(res.probabilities, torch.softmax(out, 1))
    close(res.target_scores, out.gather(1, res.target_ids))
    assert res.target_ids.dtype == torch.long and res.layers == ("features.3",)
    assert res.methods == ("gradcam",) and res.input_size == (16, 16)
    given = Explainer(model, "features.3").explain(x, targets=torch.tensor([1, 2, 3]))
    assert given.target_ids.tolist() == [[1], [2], [3]]


def test_score_function_with_an_extra_model_input() -> None:
    """A VQA answer's log-probability, per image, via the rows argument (001 sec. 2.3)."""
    model = Vqa().double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    questions = torch.tensor([[1, 2, 3], [4, 5, 6]])
    answers = torch.tensor([2, 0])

    def answer_logprob(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(out, dim=1)
        return torch.stack([lp[torch.arange(len(rows)), answers[rows]], out[:, 3]], dim=1)

    res = Explainer(model, "features").explain(
        (images, questions), methods=["gradcam", "gradcampp", "layercam"], targets=answer_logprob
    )
    assert res.target_ids.tolist() == [[0, 1], [0, 1]]
    for i in range(2):
        for j in range(2):

            def score(out: torch.Tensor, i: int = i, j: int = j) -> torch.Tensor:
                return answer_logprob(out, torch.tensor([i]))[0, j]

            a, g, s = ref_grad(model, "features", images[i : i + 1], score, (questions[i : i + 1],))
            close(res.target_scores[i, j], s)
            for m in ("gradcam", "gradcampp", "layercam"):
                close(res.map(m)[i, j], ref_map(m, a[0], g[0]))


def test_score_function_of_a_tuple_output() -> None:
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = vgg_net()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.body(x)
            return out, out * 2

    model = TwoHeads()
    x = torch.randn(2, 3, 16, 16)
    res = Explainer(model, "body.features.3").explain(x, targets=lambda o: o[1][:, :3])
    assert res.logits is None and res.probabilities is None
    assert isinstance(res.output, tuple)
    plain = Explainer(model.body, "features.3").explain(x, targets=[[0, 1, 2]] * 2)
    close(res.map("gradcam"), 2 * plain.map("gradcam"))
