"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3).

A frozen linear map W x + b gets a trainable low-rank correction:

    y = W x + b + s · B A x,     A ∈ R^{r×in}, B ∈ R^{out×r}, s = ``scaling``.

A and B are two bias-free ``nn.Linear`` submodules (``lora_A``: in→r, ``lora_B``: r→out),
so the book-keeping clipping path (:mod:`dptrain.ghost`) sees two ordinary linear layers and
computes their per-example gradient norms in closed form; the frozen base is not clipped
(it receives no update). B starts at zero, so an adapted model computes exactly what the base
model did until the first update.

Privacy assumption: only parameters with ``requires_grad`` are trained and released; the
base weights are fixed (public, e.g. pre-trained on public data).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``base(x) + scaling · lora_B(lora_A(x))`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear: base must be an nn.Linear, got {type(base).__name__}")
        if not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(f"LoRALinear: rank must be in [1, min(in, out)] = [1, "
                             f"{min(base.in_features, base.out_features)}] for {base}, got {rank}")
        if not (scaling > 0 and math.isfinite(scaling)):
            raise ValueError(f"LoRALinear: scaling must be a positive finite number, got {scaling}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.rank, self.scaling = int(rank), float(scaling)
        with torch.no_grad():  # A ~ N(0, 1/in) rows (as in FFA-LoRA), B = 0
            self.lora_A.weight.copy_(torch.randn(self.lora_A.weight.shape, generator=generator)
                                     .to(w) / math.sqrt(base.in_features))
            self.lora_B.weight.zero_()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight W + s·B A, for code that reads ``linear.weight`` instead of calling the layer
        (nn.TransformerEncoderLayer's inference fast path does)."""
        return self.base.weight + self.delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """The adapter's weight update s · B A (out × in)."""
        return self.scaling * self.lora_B.weight @ self.lora_A.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight W + s·B A (for export / inference)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        out.requires_grad_(self.base.weight.requires_grad)  # frozen like the base it replaces
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}"


def _in_attention(parent: nn.Module) -> bool:
    # nn.MultiheadAttention reads out_proj.weight directly (F.multi_head_attention_forward):
    # replacing out_proj would bypass the adapter, so it is never adapted.
    return isinstance(parent, nn.MultiheadAttention)


def add_lora(model: nn.Module, rank: int, scaling: float = 1.0,
             target: Callable[[str, nn.Linear], bool] | Iterable[str] | None = None,
             seed: int | None = None) -> list[str]:
    """Freeze every parameter of ``model`` and wrap its ``nn.Linear`` layers in :class:`LoRALinear`.

    ``target``: names of the linear layers to adapt (``named_modules()`` names), or a predicate
    ``(name, linear) -> bool``; default: every ``nn.Linear`` except ``MultiheadAttention.out_proj``
    (which attention uses outside its forward). Returns the adapted layers' names. Afterwards the
    only trainable parameters are the adapters' ``lora_A`` / ``lora_B`` weights.
    """
    if target is not None and not callable(target):
        wanted = set(target)
        names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = wanted - names
        if unknown:
            raise ValueError(f"add_lora: no nn.Linear named {sorted(unknown)} in the model; "
                             f"linear layers are {sorted(names)}")
        target = lambda name, _m: name in wanted  # noqa: E731
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if type(model) is nn.Linear:
        raise ValueError("add_lora: the model is a bare nn.Linear; adapters replace child layers, so wrap it "
                         "(e.g. nn.Sequential(linear)) or use LoRALinear(linear, rank) directly")
    picked = []  # chosen before anything is frozen: a model with nothing to adapt is left as it was
    for name, parent in list(model.named_modules()):
        if isinstance(parent, LoRALinear) or _in_attention(parent):
            continue
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or (target is not None and not target(full, child)):
                continue
            picked.append((parent, child_name, child, full))
    if not picked:
        raise ValueError("add_lora: no nn.Linear layer to adapt (the model has none outside attention and "
                         "existing adapters, or target matched none)")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, child_name, child, _ in picked:
        setattr(parent, child_name, LoRALinear(child, rank, scaling, generator))
    return [full for *_, full in picked]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapters, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by its merged ``nn.Linear`` (in place); return ``model``."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, LoRALinear):
                setattr(m, child_name, child.merged())
    return model
