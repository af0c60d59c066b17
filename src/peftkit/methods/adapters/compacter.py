"""Compacter and Compacter++ (Mahabadi et al., 2021): bottleneck adapters whose projections are parameterised
hypercomplex multiplication (PHM) layers, with AdapterHub's fields, defaults and parameter names.

A PHM layer with ``n = phm_dim`` builds its ``[in, out]`` matrix from ``n`` small "rule" matrices ``R_k`` (``n x n``)
and ``n`` weight blocks ``W_k`` (``in/n x out/n``, factorised as ``W_left @ W_right`` of rank ``phm_rank``):

    H = sum_k kron(R_k, W_k),    y = x @ H + b        (x @ H, not x @ H^T, as AdapterHub computes it)

With ``shared_phm_rule`` (default) one rule per adapter is shared by every PHM layer; it lives on the engine
(``adapters_shared.<adapter>.phm_rule``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from peftkit.methods.adapters.bottleneck import DoubleSeqBnConfig, SeqBnConfig, register_preset


@dataclass
class CompacterConfig(DoubleSeqBnConfig):
    """Compacter: Houlsby placement (after attention and feed-forward), PHM projections, reduction 32, gelu."""

    phm_layer: bool = True
    reduction_factor: Optional[Union[float, dict]] = 32
    non_linearity: Optional[str] = "gelu"


@dataclass
class CompacterPlusPlusConfig(SeqBnConfig):
    """Compacter++: Pfeiffer placement (after the feed-forward block only), PHM projections, reduction 32, gelu."""

    phm_layer: bool = True
    reduction_factor: Optional[Union[float, dict]] = 32
    non_linearity: Optional[str] = "gelu"


def _init_rule(t: torch.Tensor, c_init: str, std: float, bound: float) -> None:
    with torch.no_grad():
        if c_init == "uniform":
            t.uniform_(-bound, bound)
        else:
            t.normal_(0.0, std)


def shared_phm_parameters(config) -> nn.ParameterDict:
    """The rule shared by all PHM layers of one adapter: N(0, phm_init_range) or U(-1, 1)."""
    n = config.phm_dim
    params = nn.ParameterDict()
    shapes = {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)} if config.factorized_phm_rule else {
        "phm_rule": (n, n, n)}
    for name, shape in shapes.items():
        p = nn.Parameter(torch.empty(shape), requires_grad=bool(config.learn_phm))
        _init_rule(p, config.phm_c_init, config.phm_init_range, 1.0)
        params[name] = p
    return params


class PHMLinear(nn.Module):
    """``y = x @ sum_k kron(rule_k, W_k) + b``; parameter names as AdapterHub's ``PHMLayer``."""

    def __init__(self, in_features: int, out_features: int, config, position: str,
                 shared: Optional[nn.ParameterDict] = None) -> None:
        super().__init__()
        n = config.phm_dim
        for what, size in (("in", in_features), ("out", out_features)):
            if size % n:
                raise ValueError(
                    f"Compacter's {position}-projection has {what}_features={size}, not divisible by phm_dim={n}; "
                    f"choose a reduction_factor that makes the bottleneck a multiple of {n} (or another phm_dim).")
        self.in_features, self.out_features, self.n = in_features, out_features, n
        self.factorized_W = bool(config.factorized_phm_W)
        self.factorized_rule = bool(config.factorized_phm_rule)
        # the shared rule: a plain reference (not a submodule), so it is stored once, on the engine
        self._shared = (shared,) if config.shared_phm_rule else (None,)
        if not config.shared_phm_rule:
            shapes = {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)} if self.factorized_rule else {
                "phm_rule": (n, n, n)}
            for name, shape in shapes.items():
                p = nn.Parameter(torch.empty(shape), requires_grad=bool(config.learn_phm))
                _init_rule(p, config.phm_c_init, 0.01, 0.01)
                setattr(self, name, p)
        a, b, r = in_features // n, out_features // n, config.phm_rank
        if self.factorized_W:
            self.W_left = nn.Parameter(torch.empty(n, a, r))
            self.W_right = nn.Parameter(torch.empty(n, r, b))
        else:
            self.W = nn.Parameter(torch.empty(n, a, b))
        self.b = nn.Parameter(torch.zeros(out_features)) if config.phm_bias else None
        with torch.no_grad():  # xavier-normal per slice (AdapterHub uses it whatever hypercomplex_nonlinearity says)
            for i in range(n):
                for t in ((self.W_left, self.W_right) if self.factorized_W else (self.W,)):
                    nn.init.xavier_normal_(t[i])

    def rule(self) -> torch.Tensor:
        src = self._shared[0] if self._shared[0] is not None else self._parameters
        if self.factorized_rule:
            return torch.bmm(src["phm_rule_left"], src["phm_rule_right"])
        return src["phm_rule"]

    def weight_blocks(self) -> torch.Tensor:
        return torch.bmm(self.W_left, self.W_right) if self.factorized_W else self.W

    def matrix(self) -> torch.Tensor:
        """H, shape [in, out]: H[i*a + p, j*b + q] = sum_k rule[k, i, j] * W[k, p, q]."""
        rule, w = self.rule(), self.weight_blocks()
        return torch.einsum("kij,kpq->ipjq", rule, w).reshape(self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.matrix().to(x.dtype)
        y = x @ h
        return y + self.b if self.b is not None else y


register_preset("COMPACTER", CompacterConfig)
register_preset("COMPACTER++", CompacterPlusPlusConfig)
