"""LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient low-rank adaptation"): A frozen, B trained with a
projected gradient.

With A fixed at its initial value, the update ``s * B A`` (s: the LoRA scaling) can only move in the row space of
A. LoRA-FA picks, at every step, the gradient of B whose induced update ``s * g_B A`` is closest (Frobenius norm)
to the full fine-tuning gradient direction ``g_W`` of the layer. Since the LoRA gradient is ``g_B = s * g_W A^T``,
the least-squares solution is

    g_B* = (1 / s^2) * g_B (A A^T)^{-1}

which then goes through AdamW (Hugging Face's ``AdamW`` flavour: bias correction optional, decoupled weight decay
applied after the step). Parameters without a LoRA pair (heads in ``modules_to_save``, biases) get plain AdamW.

:func:`create_lorafa_optimizer` has Hugging Face PEFT's signature. Pairs are found structurally (each LoRA layer's
``lora_A[name]`` / ``lora_B[name]`` and its ``scaling[name]``), so linear, convolution (factors flattened to
``r x in*k*k`` and ``out x r``) and embedding layers are covered.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch.optim import Optimizer

_RIDGE = 1e-8  # added to A A^T before the (pseudo-)inverse: A's rows may be (nearly) dependent


class LoraFAOptimizer(Optimizer):
    """AdamW with LoRA-FA's projected gradient for each B factor whose group entry names its frozen A.

    ``lora_a`` maps a B parameter to its frozen A tensor (kept out of the param groups, so that the optimizer's
    state_dict holds no model tensors); each param group may hold ``scaling_factors``, the LoRA scaling s per
    parameter (None for parameters without a pair).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True,
                 lora_a: Optional[dict[torch.Tensor, torch.Tensor]] = None) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter: {beta} (betas[{i}]) - should be in [0.0, 1.0)")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)
        self.lora_a: dict[int, torch.Tensor] = {id(b): a for b, a in (lora_a or {}).items()}

    @staticmethod
    def projected_grad(grad_b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
        """LoRA-FA's gradient of B: ``(1/s^2) g_B (A A^T)^{-1}``, with A and B flattened to matrices."""
        a2 = a.detach().reshape(a.shape[0], -1).float()
        g2 = grad_b.reshape(grad_b.shape[0], -1).float()
        if g2.shape[1] != a2.shape[0]:  # embedding factors: B is (dim, r), A is (r, vocab)
            raise ValueError(f"LoRA-FA: B's gradient {tuple(grad_b.shape)} does not fit A {tuple(a.shape)}.")
        gram = a2 @ a2.T
        inv = torch.linalg.pinv(gram + _RIDGE * torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype))
        return ((g2 @ inv) / (scaling ** 2)).reshape(grad_b.shape).to(grad_b.dtype)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            scalings = group.get("scaling_factors") or [None] * len(group["params"])
            for p, s in zip(group["params"], scalings):
                if p.grad is None:
                    continue
                grad = p.grad
                a = self.lora_a.get(id(p))
                if a is not None and s is not None:
                    grad = self.projected_grad(grad, a, s)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:  # decoupled, after the step
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def _lora_pairs(model: nn.Module, adapters: list[str]) -> dict[int, tuple[torch.Tensor, float]]:
    """id(B parameter) -> (its A tensor, the layer's scaling), for the given adapters of every LoRA layer."""
    from peftkit.methods.lora.lora import LoraLayer

    out: dict[int, tuple[torch.Tensor, float]] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in adapters:
            if name in module.lora_A and name in module.lora_B:
                out[id(module.lora_B[name].weight)] = (module.lora_A[name].weight, module.scaling[name])
            elif name in module.lora_embedding_A and name in module.lora_embedding_B:
                # the embedding's update is (B A)^T: B (dim x r) pairs with A (r x vocab) as for a linear layer
                out[id(module.lora_embedding_B[name])] = (module.lora_embedding_A[name], module.scaling[name])
    return out


def create_lorafa_optimizer(model: nn.Module, r: int, lora_alpha: float, lr: float, weight_decay: float = 0.0,
                            use_rslora: Optional[bool] = None) -> LoraFAOptimizer:
    """A :class:`LoraFAOptimizer` for ``model`` (a PeftModel with LoRA adapters), as Hugging Face PEFT's function:
    every ``lora_A`` factor is frozen; each trainable B factor of an active adapter takes LoRA-FA's projected
    gradient with its layer's own scaling; the other trainable parameters take AdamW.

    ``r`` and ``lora_alpha`` are PEFT's arguments; the scaling used is each layer's (rank and alpha patterns
    included). ``use_rslora`` is deprecated (as in PEFT): if given, it must agree with the active adapters' configs.
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"create_lorafa_optimizer: r must be a positive integer, got {r!r}.")
    peft_config = getattr(model, "peft_config", {}) or {}
    active = [a for a in getattr(model, "active_adapters", []) if a in peft_config]
    lora_active = [a for a in active if str(getattr(peft_config[a], "peft_type", "")) == "LORA"]
    if not lora_active:
        raise ValueError("create_lorafa_optimizer needs a model with an active LoRA adapter (LoraConfig); "
                         f"active adapters: {active or 'none'}.")
    if use_rslora is not None:
        mismatched = [a for a in lora_active if bool(getattr(peft_config[a], "use_rslora", False)) != use_rslora]
        if mismatched:
            raise ValueError(
                f"`use_rslora={use_rslora}` was passed to create_lorafa_optimizer, but the active adapters "
                f"{mismatched} have use_rslora set differently in their LoraConfig; configure rsLoRA in LoraConfig "
                "and drop the argument (it is deprecated)."
            )
        warnings.warn("`use_rslora` in create_lorafa_optimizer is deprecated; configure rsLoRA via LoraConfig.",
                      FutureWarning)
    from peftkit.methods.lora.lora import LoraLayer

    for module in model.modules():  # A stays at its initial value
        if isinstance(module, LoraLayer):
            for slot in ("lora_A", "lora_embedding_A"):
                for p in getattr(module, slot).parameters():
                    p.requires_grad_(False)
    pairs = _lora_pairs(model, lora_active)
    params, names, partners, scalings = [], [], {}, []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        params.append(p)
        names.append(name)
        a, s = pairs.get(id(p), (None, None))
        if a is not None:
            partners[p] = a
        scalings.append(s)
    if not params:
        raise ValueError("create_lorafa_optimizer: the model has no trainable parameter besides the frozen A factors.")
    group = {"params": params, "names": names, "scaling_factors": scalings, "lr": lr, "weight_decay": weight_decay,
             "betas": (0.9, 0.999)}
    return LoraFAOptimizer([group], lr=lr, weight_decay=weight_decay, lora_a=partners)


__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer"]
