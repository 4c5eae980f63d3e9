"""Shared by the dispatch parity tests: run a dispatcher forward and backward, return what to compare."""

from __future__ import annotations

import torch


def run_dispatch(fn, experts, x_TD, idx, w, keep):
    """(output, grad of x, grad of the weights, grads of every expert parameter) of one call."""
    experts.zero_grad(set_to_none=True)
    x = x_TD.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = fn(experts, x, idx, w, keep)
    # A non-uniform upstream gradient, so every path of the backward is exercised.
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    return y.detach(), x.grad, w.grad, grads
