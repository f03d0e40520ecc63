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


class Captioner(torch.nn.Module):
    """CNN encoder -> LSTM decoder with teacher forcing (001 sec. 2.2 in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, stride=2), torch.nn.ReLU()
        )
        self.init = torch.nn.Linear(8, 16)
        self.embed = torch.nn.Embedding(10, 16)
        self.lstm = torch.nn.LSTM(16, 16, batch_first=True)
        self.out = torch.nn.Linear(16, 10)
        self.eval()

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h0 = torch.tanh(self.init(self.features(image).mean(dim=(2, 3))))[None]
        y, _ = self.lstm(self.embed(tokens), (h0, torch.zeros_like(h0)))
        return self.out(y)  # (N, T, vocab)


def test_caption_word_scores_through_an_lstm() -> None:
    model = Captioner()
    images = torch.randn(2, 3, 16, 16)
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])

    def words(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(out, dim=-1)
        r = torch.arange(len(rows))
        return torch.stack([lp[r, 0, tokens[rows, 1]], lp[r, 1, tokens[rows, 2]]], dim=1)

    ex = Explainer(model, "features")
    res = ex.explain(
        (images, tokens), methods=["gradcam", "gradcampp", "ablationcam"], targets=words
    )
    assert res.logits is None and res.target_scores.shape == (2, 2)
    for j in range(2):
        one = ex.explain(
            (images, tokens),
            methods=["gradcam", "ablationcam"],
            targets=lambda o, rows, j=j: words(o, rows)[:, j : j + 1],
        )
        close(res.target_scores[:, j], one.target_scores[:, 0])
        for m in ("gradcam", "ablationcam"):
            close(res.map(m)[:, j], one.map(m)[:, 0])


def test_per_target_loop_fallback_gives_the_same_maps(monkeypatch) -> None:
    """When vmap cannot batch an op, the K targets go through one by one, same result."""
    model = vgg_net()
    x = torch.randn(2, 3, 16, 16)
    ex = Explainer(model, "features.3")
    methods = ["gradcam", "gradcampp", "gradcam_guidedrelu", "guided_backprop"]
    batched = ex.explain(x, methods=methods, targets=3)
    real = torch.autograd.grad
    refused: list[int] = []

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            refused.append(1)
            raise RuntimeError("Batching rule not implemented (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    looped = ex.explain(x, methods=methods, targets=3)
    assert len(refused) == 2  # the normal and the guided backward fell back
    for layer, maps in batched.maps.items():
        for m, v in maps.items():
            close(looped.maps[layer][m], v)
