"""Captioning and VQA tasks on tiny models: per-word and per-answer maps, per-item errors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.codecs.http import decode_map
from camserve.engine import Explainer
from camserve.service.images import decode_image
from camserve.service.text_tasks import CaptionTask, VQATask

from .conftest import TRANSFORM, JsonRunner, json_item, png

VOCAB = ["<pad>", "<eos>", "a", "red", "blue", "circle", "square"]
ANSWERS = ["red", "blue", "circle", "square", "yes", "no"]
QWORDS = ["<pad>", "<unk>", "what", "colour", "is", "the", "circle"]


class TinyCaptioner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.proj = nn.Linear(4, 8)
        self.embed = nn.Embedding(len(VOCAB), 8)
        self.cell = nn.LSTMCell(8, 8)
        self.out = nn.Linear(8, len(VOCAB))

    def _start(self, images: Tensor) -> tuple[Tensor, Tensor]:
        v = torch.tanh(self.proj(self.enc(images).mean(dim=(2, 3))))
        return self.cell(v)

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        state = self._start(images)
        prev = torch.cat([torch.full_like(tokens[:, :1], 2), tokens[:, :-1]], dim=1)
        logits = []
        for t in range(tokens.shape[1]):
            state = self.cell(self.embed(prev[:, t]), state)
            logits.append(self.out(state[0]))
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def generate(self, images: Tensor) -> Tensor:
        state = self._start(images)
        word = torch.full((images.shape[0],), 2, dtype=torch.long)
        out = []
        for _ in range(5):
            state = self.cell(self.embed(word), state)
            word = self.out(state[0]).argmax(dim=1)
            out.append(word)
        return torch.stack(out, dim=1)


class TinyVQA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.embed = nn.Embedding(len(QWORDS), 6, padding_idx=0)
        self.head = nn.Linear(6, len(ANSWERS))

    def forward(self, images: Tensor, q: Tensor) -> Tensor:
        img = self.cnn(images).mean(dim=(2, 3))
        return self.head(img * self.embed(q).sum(dim=1))


def tokenize(text: str) -> list[int]:
    return [QWORDS.index(w) if w in QWORDS else 1 for w in text.lower().rstrip("?").split()]


def caption_runner() -> tuple[JsonRunner, nn.Module]:
    torch.manual_seed(2)
    model = TinyCaptioner().eval()
    task = CaptionTask("cap", model, model.generate, VOCAB, 1, "enc.1", TRANSFORM)
    return JsonRunner(task), model


def vqa_runner() -> tuple[JsonRunner, nn.Module]:
    torch.manual_seed(3)
    model = TinyVQA().eval()
    return JsonRunner(VQATask("vqa", model, ANSWERS, tokenize, "cnn.1", TRANSFORM)), model


def body(r: Any) -> dict[str, Any]:
    assert r.status == 200, r.body
    out: dict[str, Any] = json.loads(r.body)
    return out


def test_caption_words_and_whole_caption_match_the_engine() -> None:
    runner, model = caption_runner()
    image = png(1)
    out = body(runner.run([json_item(image, methods=["gradcam"])])[0])
    x = TRANSFORM(decode_image(image))[None]
    ids = model.generate(x)[0].tolist()
    words = ids[: ids.index(1)] if 1 in ids else ids
    assert out["words"] == [VOCAB[w] for w in words]
    assert out["caption"] == " ".join(out["words"])
    assert out["score"] == "log_probability"
    assert out["timings"]["generate"] > 0
    tokens = torch.tensor([[*words, 1]])

    def score(logits: Tensor) -> Tensor:
        lp = F.log_softmax(logits, dim=-1).gather(2, tokens.unsqueeze(-1)).squeeze(-1)
        return torch.cat([lp, lp.sum(dim=1, keepdim=True)], dim=1)

    with torch.enable_grad():
        exp = Explainer(model, "enc.1").explain((x, tokens), methods=("gradcam",), targets=score)
    expl = out["explanations"]
    assert len(expl) == len(words) + 1
    cols = [*range(len(words)), len(words) + 1]
    for e, col in zip(expl, cols, strict=True):
        np.testing.assert_allclose(
            decode_map(e["maps"]["gradcam"]), exp.upsampled("gradcam")[0, col], atol=1e-6
        )
    assert expl[-1]["caption"] == out["caption"]
    # The whole caption's score is the sum of its words' log-probabilities and <eos>'s.
    total = sum(e["score"] for e in expl[:-1]) + float(exp.target_scores[0, len(words)])
    np.testing.assert_allclose(expl[-1]["score"], total, atol=1e-4)
    np.testing.assert_allclose(expl[-1]["score"], float(exp.target_scores[0, -1]), atol=1e-5)


def test_caption_refuses_classifier_options() -> None:
    runner, _ = caption_runner()
    [r] = runner.run([json_item(png(1), top_k=2)])
    assert r.status == 400 and r.message == "top_k does not apply to a captioning model"


def test_vqa_answer_and_counterfactual_answers_match_the_engine() -> None:
    runner, model = vqa_runner()
    image = png(2)
    q = "what colour is the circle?"
    x = TRANSFORM(decode_image(image))[None]
    qt = torch.tensor([tokenize(q)])
    with torch.no_grad():
        logits = model(x, qt)
    pred = int(logits.argmax())
    others = [a for a in ANSWERS if a != ANSWERS[pred]][:2]
    out = body(runner.run([json_item(image, question=q, answers=others)])[0])
    assert out["answer"] == ANSWERS[pred] and out["question"] == q
    assert out["answers"][0]["answer"] == ANSWERS[pred]
    ids = [pred, *(ANSWERS.index(a) for a in others)]
    with torch.enable_grad():
        exp = Explainer(model, "cnn.1").explain(
            (x, qt), methods=("gradcam",), targets=lambda out: out[:, ids]
        )
    assert [e["answer"] for e in out["explanations"]] == [ANSWERS[i] for i in ids]
    for j, e in enumerate(out["explanations"]):
        np.testing.assert_allclose(
            decode_map(e["maps"]["gradcam"]), exp.upsampled("gradcam")[0, j], atol=1e-6
        )
        assert e["score"] == round(float(logits[0, ids[j]]), 6)


def test_vqa_batch_with_re_running_method_matches_single_items() -> None:
    runner, _ = vqa_runner()
    a = json_item(
        png(3),
        question="what colour is the circle",
        answers=["yes"],
        methods=["scorecam", "gradcam"],
    )
    b = json_item(png(4), question="is the circle red", methods=["scorecam", "gradcam"])
    both = runner.run([a, b])
    alone = [runner.run([a])[0], runner.run([b])[0]]
    for r1, r2 in zip(both, alone, strict=True):
        e1, e2 = body(r1)["explanations"], body(r2)["explanations"]
        assert len(e1) == len(e2)
        for x1, x2 in zip(e1, e2, strict=True):
            assert x1["answer"] == x2["answer"]
            for m in ("scorecam", "gradcam"):
                np.testing.assert_allclose(
                    decode_map(x1["maps"][m]), decode_map(x2["maps"][m]), atol=1e-5
                )


def test_a_named_answer_equal_to_the_models_is_explained_once() -> None:
    runner, _ = vqa_runner()
    out = body(runner.run([json_item(png(2), question="what colour is the circle")])[0])
    again = body(
        runner.run(
            [json_item(png(2), question="what colour is the circle", answers=[out["answer"], "no"])]
        )[0]
    )
    names = [e["answer"] for e in again["explanations"]]
    assert names == [out["answer"]] + (["no"] if out["answer"] != "no" else [])


def test_vqa_errors_are_per_item() -> None:
    runner, _ = vqa_runner()
    results = runner.run(
        [
            json_item(png(1)),
            json_item(png(1), question="is the circle red", answers=["purple"]),
            json_item(png(1), question="is the circle red", labels=["x"]),
            json_item(png(1), question="is the circle red"),
        ]
    )
    assert [r.status for r in results] == [400, 400, 400, 200]
    assert results[0].message == "a VQA model needs a question (field 'question')"
    assert results[1].message.startswith("unknown answer 'purple'; valid answers: blue, circle")
    assert results[2].message == "labels does not apply to a VQA model"


def test_predict_only_captions_and_answers_match_the_explained_ones() -> None:
    from camserve.service import ExplainRequest, ExplainResult

    cap, _ = caption_runner()
    vqa, _ = vqa_runner()
    image = png(5)
    q = "what colour is the circle"
    full_c, quick_c = cap.service.run(
        [
            ExplainRequest(model="cap", image=image),
            ExplainRequest(model="cap", image=image, predict_only=True),
        ]
    )
    full_v, quick_v = vqa.service.run(
        [
            ExplainRequest(model="vqa", image=image, question=q),
            ExplainRequest(model="vqa", image=image, question=q, predict_only=True),
        ]
    )
    for full, quick in ((full_c, quick_c), (full_v, quick_v)):
        assert isinstance(full, ExplainResult) and isinstance(quick, ExplainResult)
        assert quick.targets == () and full.targets
        assert (quick.caption, quick.words, quick.answer) == (full.caption, full.words, full.answer)
        for p, r in zip(quick.predictions, full.predictions, strict=True):
            assert p.label == r.label and abs(p.probability - r.probability) < 1e-5
    assert quick_c.caption and quick_v.answer and "generate" in quick_c.timings
