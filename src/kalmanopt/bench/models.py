"""The model zoo of the vision and language-model suites.

* 28x28 grey images: :class:`SmallCNN` (two conv layers, ~110 k parameters) and :func:`small_resnet` (a CIFAR-style
  ResNet with three stages of one basic block each, 8/16/32 channels, ~78 k parameters).
* 32x32 colour images (CIFAR, behind flags): :func:`resnet18` and :func:`resnet50`, the CIFAR variants of He et al.'s
  networks (3x3 stem, no max-pool), written here since torchvision is not a dependency.
* Language: :class:`GPT`, a GPT-style decoder (pre-LayerNorm, causal self-attention, 4x MLP, learned positions, head
  tied to the token embedding), 4 layers by default, over a :class:`CharTokenizer`.

Constructors take ``in_channels`` and ``num_classes`` (vision) or ``vocab_size``/``context`` (GPT) and nothing else
that is data-dependent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "MODELS", "CharTokenizer", "SmallCNN", "n_parameters", "resnet18", "resnet50", "small_resnet"]


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class SmallCNN(nn.Module):
    """conv(16, 3x3) - ReLU - max-pool - conv(32, 3x3) - ReLU - max-pool - linear(64) - ReLU - linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 16,
                 hidden: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem without max-pool, stages of blocks, global average pool, linear head."""

    def __init__(self, block: type[nn.Module], blocks: Sequence[int], widths: Sequence[int], in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, in_planes = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(block(in_planes, w, 2 if (i > 0 and j == 0) else 1))
                in_planes = w * block.expansion
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def small_resnet(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """Three stages of one basic block (8, 16, 32 channels): a ResNet-8 for 28x28 images."""
    return ResNet(BasicBlock, [1, 1, 1], [8, 16, 32], in_channels, num_classes)


def resnet18(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-18, CIFAR variant (11.2 M parameters for 10 classes)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], in_channels, num_classes)


def resnet50(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-50, CIFAR variant (23.5 M parameters for 10 classes)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], in_channels, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN, "resnet-small": small_resnet, "resnet18": resnet18, "resnet50": resnet50,
}


# ------------------------------------------------------------------------------------------------ language
class CharTokenizer:
    """Characters to ids; the vocabulary is the sorted set of characters of the text it is built from, plus an
    unknown id (0) for characters it has not seen."""

    UNK = "\x00"

    def __init__(self, text: str) -> None:
        chars = sorted(set(text) - {self.UNK})
        self.itos = [self.UNK, *chars]
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> Tensor:
        get = self.stoi.get
        return torch.tensor([get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        return "".join(self.itos[int(i)] for i in ids)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-style decoder: token + learned position embeddings, ``n_layers`` pre-LN blocks, final LayerNorm,
    a head tied to the token embedding. ``forward(ids)`` returns logits ``(B, T, vocab)``."""

    def __init__(self, vocab_size: int, context: int = 128, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(DecoderBlock(d_model, n_heads, dropout) for _ in range(n_layers)))
        self.ln = nn.LayerNorm(d_model)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        x = self.ln(self.blocks(x))
        return x @ self.tok.weight.t()
