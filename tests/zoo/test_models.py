"""The demo models: shapes, tracing, score functions, training smoke test, store round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.fx

from camserve import zoo
from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.models import load_model, read_spec
from camserve.zoo.build import BuildConfig, build, ensure_built
from camserve.zoo.models import VGGFC, Captioner, ResNetGAP, VQAModel, build_model
from camserve.zoo.scenes import CLASS_NAMES, generate_scenes
from camserve.zoo.text import ANSWERS, CAPTION_WORDS, QUESTION_WORDS, Vocab, tokenize
from camserve.zoo.train import (
    TrainConfig,
    evaluate_classifier,
    images_tensor,
    normalize,
    train_classifier,
)


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64)


@pytest.mark.parametrize("cls", [ResNetGAP, VGGFC])
def test_classifiers_trace_and_name_their_layer(cls: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    traced = torch.fx.symbolic_trace(model)
    x = _x()
    assert torch.allclose(traced(x), model(x))
    assert model(x).shape == (2, len(CLASS_NAMES))
    layer = dict(model.named_modules())[model.target_layer]  # type: ignore[index]
    assert layer is not None
    assert all(not isinstance(m, torch.nn.modules.activation.Tanh) for m in model.modules())


def test_resnet_has_gap_linear_head_and_in_place_skips() -> None:
    model = ResNetGAP().eval()
    assert isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d)
    assert isinstance(model.fc, torch.nn.Linear)
    assert model.layer2.relu.inplace and model.relu.inplace
    feats: list[torch.Tensor] = []
    model.layer2.register_forward_hook(lambda m, i, o: feats.append(o))
    out = model(_x())
    # logits are the linear head of the mean of the explained layer (CAM applies, 000 sec. 3)
    expected = model.fc(feats[0].mean(dim=(2, 3)))
    assert torch.allclose(out, expected, atol=1e-5)
    assert feats[0].shape[-2:] == (16, 16)


def test_captioner_shapes_generation_and_token_scores() -> None:
    torch.manual_seed(0)
    model = Captioner().eval()
    vocab = Vocab(CAPTION_WORDS)
    tokens = vocab.encode_batch(["a red circle left of a blue square", "a green triangle"],
                                eos=True)
    logits = model(_x(), tokens)
    assert logits.shape == (2, tokens.shape[1], len(CAPTION_WORDS))
    scores = Captioner.token_log_probs(tokens)(logits)
    assert scores.shape == tokens.shape and bool((scores <= 0).all())
    expected = torch.log_softmax(logits[1, 0], dim=0)[tokens[1, 0]]
    assert torch.isclose(scores[1, 0], expected)
    one = Captioner.token_log_probs(tokens[0])(logits)
    assert one.shape == (2, tokens.shape[1])
    ids = model.generate(_x(3), max_len=5)
    assert ids.shape[0] == 3 and ids.shape[1] <= 5
    assert len(model.decode(ids)) == 3
    with pytest.raises(InvalidRequestError, match="tokens"):
        model(_x(), tokens[:1])


def test_vqa_shapes_answer_scores_and_padding() -> None:
    torch.manual_seed(0)
    model = VQAModel().eval()
    vocab = Vocab(QUESTION_WORDS)
    q = vocab.encode_batch(["what colour is the circle?", "how many objects are there?"])
    out = model(_x(), q)
    assert out.shape == (2, len(ANSWERS))
    ids = model.answer_ids(["red", "yes"])
    assert torch.equal(VQAModel.answer_scores(ids)(out), out[:, ids])
    per_image = torch.tensor([[0], [1]])
    assert torch.equal(VQAModel.answer_scores(per_image)(out), out.gather(1, per_image))
    # right padding does not change the question's encoding
    padded = torch.cat([q, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    assert torch.allclose(model(_x(2) * 0, padded), model(_x(2) * 0, q), atol=1e-6)
    with pytest.raises(UnknownNameError, match="valid answers"):
        model.answer_ids(["purple"])


def test_vocab_and_tokenizer() -> None:
    assert tokenize("What colour is the Circle?") == ["what", "colour", "is", "the", "circle"]
    vocab = Vocab(QUESTION_WORDS)
    assert vocab.decode(vocab.encode("is there a red square?")) == "is there a red square"
    assert vocab.encode("zebra") == [vocab.id("<unk>")]
    with pytest.raises(InvalidRequestError):
        vocab.encode_batch(["what colour is the circle"], length=2)


def test_eval_mode_gradients_flow_to_the_explained_layer() -> None:
    """Grad-CAM needs d(score)/d(activation) in eval mode for every model (001 sec. 2.2-2.3)."""
    torch.manual_seed(0)
    q = Vocab(QUESTION_WORDS).encode_batch(["what colour is the circle?"] * 2)
    c = Vocab(CAPTION_WORDS).encode_batch(["a red circle"] * 2, eos=True)
    for model, extra in [(ResNetGAP(), ()), (VGGFC(), ()), (Captioner(), (c,)), (VQAModel(), (q,))]:
        model.eval()
        layer = dict(model.named_modules())[str(model.target_layer)]
        acts: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda m, i, o, acts=acts: acts.append(o))
        out = model(_x(), *extra)
        handle.remove()
        (grad,) = torch.autograd.grad(out.sum(), acts[0])
        assert grad.abs().sum() > 0


def test_training_smoke_learns_above_chance(one_thread: None) -> None:
    train = generate_scenes(seed=101, count=480, kind="single")
    test = generate_scenes(seed=102, count=240, kind="single")
    xs, ys = images_tensor(train), torch.tensor([CLASS_NAMES.index(s.label) for s in train])
    xt, yt = images_tensor(test), torch.tensor([CLASS_NAMES.index(s.label) for s in test])
    torch.manual_seed(0)
    model = ResNetGAP()
    losses = train_classifier(model, xs, ys, TrainConfig(epochs=3, batch_size=32, lr=5e-3))
    acc = evaluate_classifier(model, xt, yt)["accuracy"]
    assert losses[-1] < losses[0]
    print(f"smoke accuracy {acc:.3f}")
    assert acc > 3 / len(CLASS_NAMES), acc  # chance is 1/12


def test_tiny_build_writes_a_loadable_store(tmp_path: Path, one_thread: None) -> None:
    tiny = TrainConfig(epochs=1, batch_size=32)
    cfg = BuildConfig(single_train=64, multi_train=64, vqa_train=32, single_test=16,
                      multi_test=16, resnet=tiny, vgg=tiny, captioner=tiny, vqa=tiny)
    info = build(tmp_path, cfg, log=lambda s: None)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config_hash"] == info["config_hash"]
    names = [m["name"] for m in manifest["models"]]
    assert names == ["resnet_gap", "vgg_fc", "captioner", "vqa"]
    assert (tmp_path / "metrics.md").is_file()
    assert (tmp_path / "datasets" / "single_test" / "instances.json").is_file()
    for name in names:
        model, entry = zoo.load(tmp_path, name)
        assert not model.training
        assert entry.target_layer in dict(model.named_modules())
        assert entry.input_size == (3, 64, 64)
        # weights only: the state dict file holds tensors, not a pickled model
        state = torch.load(tmp_path / entry.state_dict, weights_only=True)
        assert isinstance(state, dict)
        fresh = build_model(entry.arch, entry.kwargs)
        fresh.load_state_dict(state)
        # the zoo's model spec builds the same model with the same weights
        loaded = load_model(read_spec(tmp_path / f"{name}.toml"))
        assert loaded.spec.kind == entry.kind and loaded.spec.layer == entry.target_layer
        assert loaded.spec.labels == entry.labels and loaded.spec.vocab == entry.vocab
        for a, b in zip(loaded.model.state_dict().values(), state.values(), strict=True):
            assert torch.equal(a, b)
    model, entry = zoo.load(tmp_path, "resnet_gap")
    assert model.labels == entry.labels == CLASS_NAMES  # type: ignore[union-attr]
    x = normalize(images_tensor(generate_scenes(seed=0, count=2)))
    assert model(x).shape == (2, len(CLASS_NAMES))
    # a matching store is reused, not rebuilt
    assert ensure_built(tmp_path, cfg, log=lambda s: None)["build_seconds"] == info[
        "build_seconds"]
    with pytest.raises(UnknownNameError, match="valid models: captioner, resnet_gap"):
        zoo.load(tmp_path, "resnet50")
    with pytest.raises(InvalidRequestError, match=r"no manifest\.json"):
        zoo.load(tmp_path / "nowhere", "resnet_gap")


def test_score_functions_follow_the_engines_rows() -> None:
    """Re-running methods score variants of one image: per-image data is indexed by rows."""
    logits = torch.randn(3, 4, len(CAPTION_WORDS))
    tokens = torch.tensor([[4, 7, 10, 3], [4, 8, 11, 3]])
    rows = torch.tensor([1, 1, 1])
    got = Captioner.token_log_probs(tokens)(logits, rows)
    expected = torch.log_softmax(logits, -1).gather(2, tokens[rows].unsqueeze(-1)).squeeze(-1)
    assert torch.equal(got, expected)
    out = torch.randn(3, len(ANSWERS))
    per_image = torch.tensor([[2], [5]])
    assert torch.equal(VQAModel.answer_scores(per_image)(out, rows), out[:, [5]])


def test_same_seed_same_weights(tmp_path: Path, one_thread: None) -> None:
    """Deterministic build: the same seed gives the same data and the same weights."""
    tiny = TrainConfig(epochs=1, batch_size=16)
    cfg = BuildConfig(single_train=32, multi_train=32, vqa_train=16, single_test=8,
                      multi_test=8, resnet=tiny, vgg=tiny, captioner=tiny, vqa=tiny)
    for run in ("a", "b"):
        build(tmp_path / run, cfg, log=lambda s: None)
    for name in ("resnet_gap", "vgg_fc", "captioner", "vqa"):
        a = torch.load(tmp_path / "a" / f"{name}.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / f"{name}.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    png = "datasets/multi_test/images/000001.png"
    assert (tmp_path / "a" / png).read_bytes() == (tmp_path / "b" / png).read_bytes()
