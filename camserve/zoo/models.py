"""The demo models: the kinds of network the Grad-CAM papers explain, kept small.

- :class:`ResNetGAP`: residual CNN (skip connections, in-place ReLU) with global
  average pooling and one linear head, so CAM applies (000 sec. 3).
- :class:`VGGFC`: plain conv stack with fully connected layers after the last
  conv, where CAM does not apply and Grad-CAM generalises it (000 sec. 3).
- :class:`Captioner`: CNN encoder whose image vector is the LSTM's first input
  (and, concatenated with the previous word, every later one), then
  teacher-forced or greedy word decoding (Neuraltalk2 style, 001 sec. 2.2).
- :class:`VQAModel`: CNN image features and an LSTM question encoding, fused by
  a point-wise product and classified over a fixed answer set by an MLP
  (Lu et al.'s model, 001 sec. 2.3).

Every model names the layer the engine explains (``target_layer``: the
rectified output of its last conv layer) and carries its labels, vocabulary or
answer list. The classifiers are torch.fx traceable. Recurrences use
``nn.LSTMCell`` so gradients flow in eval mode on every device (cuDNN's fused
LSTM refuses a backward pass outside training mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.errors import InvalidRequestError, UnknownNameError
from camserve.zoo.scenes import CLASS_NAMES
from camserve.zoo.text import ANSWERS, BOS, CAPTION_WORDS, EOS, QUESTION_WORDS

__all__ = [
    "ARCHITECTURES",
    "VGGFC",
    "BasicBlock",
    "Captioner",
    "ResNetGAP",
    "ScoreFn",
    "VQAModel",
    "build_model",
    "resnet_trunk",
    "trunk_state_from_resnet",
]

ScoreFn = Callable[..., Tensor]
"""``fn(output, rows=None) -> (B, K)``; ``rows`` (B,) maps output rows to request images
(the engine passes it when it re-runs the model on variants of one image)."""


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, inplace: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=inplace)]


def _last_relu(seq: nn.Sequential, prefix: str) -> str:
    idx = max(i for i, m in enumerate(seq) if isinstance(m, nn.ReLU))
    return f"{prefix}.{idx}"


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs, identity (or 1x1 projection) skip, in-place ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        result: Tensor = self.relu(out)
        return result


def _stem(width: int, inplace: bool = False) -> list[nn.Module]:
    """3x3 stride-2 conv, BN, ReLU and 2x2 max pooling: stride 4 (64 px -> 16x16)."""
    return [*_conv_bn_relu(3, width, stride=2, inplace=inplace), nn.MaxPool2d(2)]


class ResNetGAP(nn.Module):
    """Small ResNet: stem, two basic blocks, global average pooling, linear head.

    At 64 px the last block (``layer2``) outputs 16x16 maps; the head is
    ``fc(GAP(layer2))``, the architecture for which CAM, Grad-CAM, XGrad-CAM and
    sum-normalised Ablation-CAM coincide (000 sec. 3).
    """

    arch = "resnet_gap"
    target_layer = "layer2"

    def __init__(self, labels: Sequence[str] = CLASS_NAMES, width: int = 16) -> None:
        super().__init__()
        self.labels: tuple[str, ...] = tuple(labels)
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(w, 2 * w)
        self.layer2 = BasicBlock(2 * w, 2 * w)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, len(self.labels))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        logits: Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits


def resnet_trunk(width: int = 16) -> nn.Sequential:
    """The convolutional trunk of :class:`ResNetGAP` as a Sequential (16x16 maps at 64 px).

    Indices 0-5: conv, BN, in-place ReLU, max pooling, ``layer1``, ``layer2``;
    :func:`trunk_state_from_resnet` maps a trained ResNetGAP's weights onto it.
    """
    w = width
    return nn.Sequential(*_stem(w, inplace=True), BasicBlock(w, 2 * w), BasicBlock(2 * w, 2 * w))


_TRUNK_KEYS = {"conv1.": "0.", "bn1.": "1.", "layer1.": "4.", "layer2.": "5."}


def trunk_state_from_resnet(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A :func:`resnet_trunk` state dict from a :class:`ResNetGAP` one (head dropped)."""
    out = {}
    for key, value in state.items():
        for src, dst in _TRUNK_KEYS.items():
            if key.startswith(src):
                out[dst + key[len(src):]] = value
    return out


def _features(width: int) -> nn.Sequential:
    """Stem, then three 3x3 conv/BN/ReLU layers at stride 4 (16x16 at 64 px)."""
    w = width
    return nn.Sequential(
        *_stem(w), *_conv_bn_relu(w, 2 * w), *_conv_bn_relu(2 * w, 2 * w),
        *_conv_bn_relu(2 * w, 2 * w),
    )


class VGGFC(nn.Module):
    """Small VGG: conv/BN/ReLU layers, max pooling, then two fully connected layers.

    The head sees the flattened 8x8 maps, so no per-class channel weight
    exists and CAM does not apply; Grad-CAM still does (000 sec. 3).
    """

    arch = "vgg_fc"

    def __init__(self, labels: Sequence[str] = CLASS_NAMES, width: int = 16,
                 hidden: int = 128, image_size: int = 64) -> None:
        super().__init__()
        self.labels: tuple[str, ...] = tuple(labels)
        self.features = nn.Sequential(*_features(width), nn.MaxPool2d(2))
        self.target_layer = _last_relu(self.features, "features")
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(),
            nn.Linear(hidden, len(self.labels)),
        )

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.classifier(self.features(x))
        return logits


class Captioner(nn.Module):
    """CNN encoder + LSTM decoder (Neuraltalk2 style, 001 sec. 2.2).

    The encoder is the ResNet trunk (:func:`resnet_trunk`; the build starts it
    from the trained classifier, as Neuraltalk2 starts from a pretrained VGG-16).
    The image vector (conv maps at 16x16 -> pooled to 8x8 -> flattened ->
    linear -> ReLU) is the LSTM's input at the first time step; then ``<bos>``
    and the caption's words follow (teacher forcing), each concatenated with
    the image vector. ``forward(images, tokens)``
    returns logits (N, T, V) where ``logits[:, t]`` predicts ``tokens[:, t]``;
    captions end with ``<eos>`` and are right-padded with ``<pad>`` (id 0).
    """

    arch = "captioner"

    def __init__(self, vocab: Sequence[str] = CAPTION_WORDS, width: int = 16,
                 embed: int = 128, hidden: int = 128, image_size: int = 64,
                 max_len: int = 16) -> None:
        super().__init__()
        self.vocab: tuple[str, ...] = tuple(vocab)
        self.max_len = max_len
        self.bos_id = self.vocab.index(BOS)
        self.eos_id = self.vocab.index(EOS)
        self.encoder = resnet_trunk(width)
        self.target_layer = f"encoder.{len(self.encoder) - 1}"
        side = image_size // 8
        self.project = nn.Sequential(
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * side * side, embed), nn.ReLU(),
        )
        self.embed = nn.Embedding(len(self.vocab), embed, padding_idx=0)
        self.cell = nn.LSTMCell(2 * embed, hidden)
        self.out = nn.Linear(hidden, len(self.vocab))

    def _start(self, images: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Image vector and the LSTM state after reading it (the first time step)."""
        img = self.project(self.encoder(images))
        zero = img.new_zeros(img.shape[0], self.embed.embedding_dim)
        return img, self.cell(torch.cat([img, zero], dim=1))

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[0] != images.shape[0]:
            raise InvalidRequestError(
                f"tokens must be (N, T) with N={images.shape[0]}, got {tuple(tokens.shape)}")
        img, state = self._start(images)
        bos = torch.full_like(tokens[:, :1], self.bos_id)
        words = self.embed(torch.cat([bos, tokens[:, :-1]], dim=1))
        logits = []
        for t in range(words.shape[1]):
            state = self.cell(torch.cat([img, words[:, t]], dim=1), state)
            logits.append(self.out(state[0]))
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def generate(self, images: Tensor, max_len: int | None = None) -> Tensor:
        """Greedy decoding: LongTensor (N, L) of word ids, ``<pad>`` after ``<eos>``."""
        steps = self.max_len if max_len is None else max_len
        img, state = self._start(images)
        word = torch.full((images.shape[0],), self.bos_id, dtype=torch.long,
                          device=images.device)
        done = torch.zeros_like(word, dtype=torch.bool)
        out = []
        for _ in range(steps):
            state = self.cell(torch.cat([img, self.embed(word)], dim=1), state)
            word = self.out(state[0]).argmax(dim=1)
            word = torch.where(done, torch.zeros_like(word), word)
            out.append(word)
            done = done | (word == self.eos_id)
            if bool(done.all()):
                break
        return torch.stack(out, dim=1)

    def decode(self, ids: Tensor) -> list[str]:
        """Caption strings of a (N, L) id tensor (up to ``<eos>``)."""
        rows: list[list[int]] = ids.tolist()
        return [" ".join(self.vocab[i] for i in r[:r.index(self.eos_id)]
                         if i not in (0, self.bos_id))
                if self.eos_id in r else
                " ".join(self.vocab[i] for i in r if i not in (0, self.bos_id))
                for r in rows]

    @staticmethod
    def token_log_probs(tokens: Tensor) -> ScoreFn:
        """Engine target: the log-probability of each word of a given caption (001 sec. 2.2).

        Args:
            tokens: LongTensor (T,) or (N, T), the caption fed as ``tokens`` to
                ``forward`` (ending with ``<eos>``).

        Returns:
            A ScoreFn mapping logits (N, T, V) to log p(tokens[:, t]) (N, T).
        """
        def score(logits: Tensor, rows: Tensor | None = None) -> Tensor:
            ids = tokens.to(logits.device)
            if ids.dim() == 1:
                ids = ids.unsqueeze(0).expand(logits.shape[0], -1)
            elif rows is not None:
                ids = ids[rows.to(ids.device)]
            if ids.shape != logits.shape[:2]:
                raise InvalidRequestError(f"caption tokens {tuple(ids.shape)} do not match "
                                          f"logits {tuple(logits.shape)}")
            return F.log_softmax(logits, dim=-1).gather(2, ids.unsqueeze(-1)).squeeze(-1)
        return score


class VQAModel(nn.Module):
    """VQA after Lu et al. (001 sec. 2.3): CNN + LSTM, point-wise product, MLP over answers.

    Image: ResNet trunk (:func:`resnet_trunk`, started from the trained
    classifier as Lu et al. start from a pretrained CNN), conv maps (16x16,
    the explained layer) -> global average pooling ->
    linear -> tanh. Question: word embeddings -> LSTM, last state at the last
    real word -> linear -> tanh. Their point-wise product goes through a
    two-layer MLP to answer logits (N, A). ``forward(images, question_tokens)``
    takes right-padded question ids (N, T).
    """

    arch = "vqa"

    def __init__(self, vocab: Sequence[str] = QUESTION_WORDS,
                 answers: Sequence[str] = ANSWERS, width: int = 16, embed: int = 64,
                 dim: int = 128) -> None:
        super().__init__()
        self.vocab: tuple[str, ...] = tuple(vocab)
        self.answers: tuple[str, ...] = tuple(answers)
        self.cnn = resnet_trunk(width)
        self.target_layer = f"cnn.{len(self.cnn) - 1}"
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.image_fc = nn.Linear(2 * width, dim)
        self.embed = nn.Embedding(len(self.vocab), embed, padding_idx=0)
        self.cell = nn.LSTMCell(embed, dim)
        self.question_fc = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, len(self.answers)))

    def encode_question(self, tokens: Tensor) -> Tensor:
        """(N, dim) question vector: the LSTM state after the last non-padding word."""
        words = self.embed(tokens)
        real = tokens != 0
        n = tokens.shape[0]
        h = words.new_zeros(n, self.cell.hidden_size)
        c = words.new_zeros(n, self.cell.hidden_size)
        for t in range(tokens.shape[1]):
            h2, c2 = self.cell(words[:, t], (h, c))
            keep = real[:, t].unsqueeze(1)
            h, c = torch.where(keep, h2, h), torch.where(keep, c2, c)
        return torch.tanh(self.question_fc(h))

    def encode_image(self, images: Tensor) -> Tensor:
        """(N, dim) image vector: tanh of a linear map of the pooled conv features."""
        return torch.tanh(self.image_fc(torch.flatten(self.pool(self.cnn(images)), 1)))

    def answer_logits(self, image_vectors: Tensor, question_vectors: Tensor) -> Tensor:
        """(N, A) answer logits of the point-wise product of the two vectors (001 sec. 2.3)."""
        logits: Tensor = self.mlp(image_vectors * question_vectors)
        return logits

    def forward(self, images: Tensor, question_tokens: Tensor) -> Tensor:
        if question_tokens.dim() != 2 or question_tokens.shape[0] != images.shape[0]:
            raise InvalidRequestError(
                f"question tokens must be (N, T) with N={images.shape[0]}, "
                f"got {tuple(question_tokens.shape)}")
        return self.answer_logits(self.encode_image(images), self.encode_question(question_tokens))

    def answer_ids(self, names: Sequence[str]) -> list[int]:
        """Ids of answer names; unknown names raise UnknownNameError."""
        out = []
        for a in names:
            if a not in self.answers:
                raise UnknownNameError("answer", a, self.answers)
            out.append(self.answers.index(a))
        return out

    @staticmethod
    def answer_scores(answer_ids: Sequence[int] | Tensor) -> ScoreFn:
        """Engine target: the logits of given answers (001 sec. 2.3), (N, A) -> (N, K).

        ``answer_ids`` is (K,) for every image or (N, K) per image (then
        indexed by the engine's ``rows`` when it re-runs the model on variants).
        """
        def score(logits: Tensor, rows: Tensor | None = None) -> Tensor:
            ids = torch.as_tensor(answer_ids, dtype=torch.long, device=logits.device)
            if ids.dim() == 1:
                return logits[:, ids]
            if rows is not None:
                ids = ids[rows.to(ids.device)]
            return logits.gather(1, ids)
        return score


ARCHITECTURES: dict[str, type[nn.Module]] = {
    ResNetGAP.arch: ResNetGAP, VGGFC.arch: VGGFC, Captioner.arch: Captioner,
    VQAModel.arch: VQAModel,
}


def build_model(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """A fresh model of architecture ``arch`` built with constructor ``kwargs``."""
    if arch not in ARCHITECTURES:
        raise UnknownNameError("architecture", arch, ARCHITECTURES)
    return ARCHITECTURES[arch](**kwargs)
