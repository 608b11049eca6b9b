"""Fixtures shared by the attribution tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


def _trained_like(net: nn.Module, generator: torch.Generator, bias: bool = True) -> nn.Module:
    """Give the batch norms of ``net`` statistics and affines as after training (in place)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                if bias:
                    m.bias.normal_(0, 0.2, generator=generator)
    return net


@pytest.fixture(scope="session")
def trained_like_batchnorm() -> Callable[..., nn.Module]:
    """``f(net, generator, bias=True)``: random batch-norm statistics and affines as after training,
    so that folding them into convolutions is not a no-op."""
    return _trained_like
