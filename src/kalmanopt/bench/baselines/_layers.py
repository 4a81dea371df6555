"""What K-FAC and AdaFisher share (our implementation): the layers they precondition, hooks that capture each
layer's inputs and output gradients during the ordinary forward and backward pass, and the rows those become.

For a layer ``y = W a (+ b)`` the *input rows* are the vectors ``a`` (one per sample for ``nn.Linear`` on ``(N, d)``
inputs, one per sample and position for ``(B, T, d)`` inputs, one per sample and output pixel for ``nn.Conv2d``: the
unfolded patches), with a trailing 1 when the layer has a bias, so that ``[W | b]`` acts on them as one matrix. The
*gradient rows* are the matching ``dL/dy``. ``samples`` is how many loss terms the batch's mean loss averaged: rows
for ``nn.Linear``, the batch size for ``nn.Conv2d`` (each image is one sample whatever its number of positions).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Layer:
    """A preconditioned layer, what the hooks captured in the last forward/backward, and its parameters."""

    module: nn.Module
    a: Tensor | None = None  # input rows (N, d_in [+1])
    g: Tensor | None = None  # gradient rows (N, d_out)
    samples: int = 0
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    def grad_matrix(self) -> Tensor | None:
        """``[dW | db]`` as one ``(d_out, d_in [+1])`` matrix, or None if the weight has no gradient."""
        w = self.module.weight
        if w.grad is None:
            return None
        m = w.grad.reshape(w.shape[0], -1)
        if self.has_bias:
            b = self.module.bias.grad
            m = torch.cat([m, (b if b is not None else torch.zeros_like(self.module.bias)).unsqueeze(1)], 1)
        return m

    def split(self, matrix: Tensor) -> list[tuple[nn.Parameter, Tensor]]:
        """Undo :meth:`grad_matrix`: ``(weight, part shaped like it)``, and ``(bias, part)``."""
        w = self.module.weight
        out = [(w, matrix[:, : matrix.shape[1] - int(self.has_bias)].reshape(w.shape))]
        if self.has_bias:
            out.append((self.module.bias, matrix[:, -1]))
        return out


def supported(module: nn.Module) -> bool:
    """``nn.Linear`` and ordinary ``nn.Conv2d`` (no groups, numeric zero padding)."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)  # (B, C*kh*kw, L), the weight's (C, kh, kw) order
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return rows


def grad_rows(module: nn.Module, g: Tensor) -> tuple[Tensor, int]:
    """``(rows, samples)``."""
    if isinstance(module, nn.Conv2d):
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]), g.shape[0]
    rows = g.reshape(-1, g.shape[-1])
    return rows, rows.shape[0]


class LayerHooks:
    """Hooks the supported layers of ``model``; ``capture`` (a callable returning bool) says whether this forward pass
    should be recorded (only passes with gradients enabled are). A parameter that belongs to no supported layer, or
    to more than one, is left to the plain update."""

    def __init__(self, model: nn.Module, capture) -> None:
        self.capture = capture
        self.layers: list[Layer] = []
        owners: dict[int, int] = {}
        candidates = [m for m in model.modules() if supported(m)]
        for m in candidates:
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        for m in candidates:
            own = list(m.parameters(recurse=False))
            if not m.weight.requires_grad or any(owners[id(p)] > 1 for p in own):
                continue
            self.layers.append(Layer(m, params=own))
        self.handles = [layer.module.register_forward_hook(self._forward_hook(layer)) for layer in self.layers]

    def _forward_hook(self, layer: Layer):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad and self.capture()):
                return
            layer.a = input_rows(module, inputs[0].detach())

            def save_grad(g: Tensor) -> None:
                layer.g, layer.samples = grad_rows(module, g.detach())

            output.register_hook(save_grad)

        return hook

    def owned(self) -> set[int]:
        return {id(p) for layer in self.layers for p in layer.params}

    def clear(self) -> None:
        for layer in self.layers:
            layer.a = layer.g = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def trainable(model: nn.Module) -> Iterable[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
