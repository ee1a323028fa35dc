"""Torch modules the tensor benchmark serves (`--module zeroserve.tooling.bench.modules:NAME`)."""

from __future__ import annotations

import torch


class FirstElement(torch.nn.Module):
    """Returns one element of its input: only the handoff is measured, not compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)[:1].clone()


class BigOutput(torch.nn.Module):
    """Returns a 64 MiB float32 tensor made once: measures the output path."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.randn(16 * 1024 * 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


class Scale(torch.nn.Module):
    """y = 2x + 1 with a row dimension: batchable, for tests."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


def first_element() -> torch.nn.Module:
    return FirstElement()


def big_output() -> torch.nn.Module:
    return BigOutput()


def scale() -> torch.nn.Module:
    return Scale()
