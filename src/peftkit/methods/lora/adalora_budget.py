"""AdaLoRA's rank budget (Zhang et al., 2023): importance scores, the cubic budget schedule and rank masks.

Each adapted matrix is ``B diag(E) A`` (A: r x in, E: r x 1, B: out x r); triplet ``i`` is
``(A[i], E[i], B[:, i])``. A triplet's importance is the sum of its parts' element scores, each element score being
``sensitivity_ema * uncertainty_ema`` with ``sensitivity = |w * grad|``. Every ``deltaT`` steps the globally
least important triplets are switched off by zeroing their ``E`` entry, so that the number of live triplets
(the *budget*, summed over all matrices) follows a cubic decrease from ``init_r * n`` to ``target_r * n``.

The functions follow Hugging Face PEFT's ``RankAllocator`` operation by operation, so that the same gradients
give the same masks (ties at the threshold are masked too, as there).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

# One adapted matrix: (A (r, in), E (r, 1), B (out, r)).
Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def budget_schedule(
    step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int, deltaT: int
) -> tuple[int, bool]:
    """Budget (total live triplets) at ``step`` and whether to re-mask at this step.

    Warm-up (``step <= tinit``): the full budget, no masking. Final phase (``step > total_step - tfinal``): the
    target budget. In between: ``target + (init - target) * (1 - progress)^3``, masking every ``deltaT`` steps.
    """
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * (remaining**3) + target_budget)
    return budget, step % deltaT == 0


def triplet_scores(element_scores: Triplet) -> torch.Tensor:
    """Importance (r,) of each triplet from the element scores of A (r, in), E (r, 1) and B (out, r)."""
    score_a, score_e, score_b = element_scores
    a = score_a.mean(dim=1, keepdim=True)  # (r, 1)
    b = score_b.mean(dim=0).view(-1, 1)  # (r, 1)
    return score_e.view(-1) + (a + b).view(-1)


class RankAllocator:
    """Importance bookkeeping and masking for one adapter.

    ``update_importance`` must see the gradients of the step (call it after ``backward()`` and before
    ``zero_grad()``); ``mask_to_budget`` zeroes the E entries of the least important triplets and returns the
    keep-masks per matrix.
    """

    def __init__(self, beta1: float, beta2: float, init_budget: int, target_budget: int) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        self.init_budget = init_budget
        self.target_budget = target_budget
        self.reset()

    def reset(self) -> None:
        """Forget the importance averages (done once the final rank pattern is fixed)."""
        self.sensitivity: dict[str, list[torch.Tensor]] = {}  # EMA of |w * grad| per matrix, A/E/B
        self.uncertainty: dict[str, list[torch.Tensor]] = {}  # EMA of |current - EMA|

    @property
    def has_scores(self) -> bool:
        return bool(self.sensitivity)

    @torch.no_grad()
    def update_importance(self, triplets: Mapping[str, Triplet]) -> None:
        """Fold this step's sensitivities into the averages. Raises if no parameter has a gradient."""
        if not any(p.grad is not None for t in triplets.values() for p in t):
            raise RuntimeError(
                "AdaLoRA's update_and_allocate found no gradients on the adapter parameters. Call it after "
                "loss.backward() and before optimizer.zero_grad() (attach_to_optimizer and AdaLoraCallback do this)."
            )
        for key, params in triplets.items():
            if key not in self.sensitivity:
                self.sensitivity[key] = [torch.zeros_like(p) for p in params]
                self.uncertainty[key] = [torch.zeros_like(p) for p in params]
            sens, unc = self.sensitivity[key], self.uncertainty[key]
            for i, p in enumerate(params):
                # A matrix the forward did not reach this step has no gradient: its sensitivity is zero.
                current = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                sens[i] = self.beta1 * sens[i] + (1 - self.beta1) * current
                unc[i] = self.beta2 * unc[i] + (1 - self.beta2) * (current - sens[i]).abs()

    def scores(self) -> dict[str, torch.Tensor]:
        """Importance (r,) of every triplet, per matrix."""
        return {
            key: triplet_scores(tuple(s * u for s, u in zip(self.sensitivity[key], self.uncertainty[key])))
            for key in self.sensitivity
        }

    @torch.no_grad()
    def mask_to_budget(self, triplets: Mapping[str, Triplet], budget: int) -> dict[str, list[bool]]:
        """Zero the E entries of the ``init_budget - budget`` least important triplets; return keep-masks."""
        if not self.has_scores:
            raise RuntimeError(
                "AdaLoRA has no importance scores to allocate the rank budget with: call update_and_allocate(step) "
                "at every training step from the first one on."
            )
        scores = self.scores()
        n_prune = self.init_budget - budget
        threshold: Optional[float] = None
        if n_prune > 0:
            flat = torch.cat([scores[key] for key in triplets])
            threshold = torch.kthvalue(flat, k=min(n_prune, flat.numel()))[0].item()
        pattern: dict[str, list[bool]] = {}
        for key, (_, e, _) in triplets.items():
            if threshold is None:  # budget not below the start: nothing to prune
                keep = torch.ones(e.shape[0], dtype=torch.bool, device=e.device)
            else:
                keep = ~(scores[key] <= threshold)
            e.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[key] = keep.tolist()
        return pattern


@torch.no_grad()
def apply_rank_pattern(triplets: Mapping[str, Triplet], masks: Mapping[str, list[bool]]) -> None:
    """Re-zero the pruned E entries (the optimiser moves them again after every step in the final phase).

    Matrices already resized to their kept rank (the mask has more entries than E) are left alone.
    """
    for key, (_, e, _) in triplets.items():
        mask = masks.get(key)
        if mask is None or len(mask) != e.shape[0]:
            continue
        keep = torch.tensor(mask, dtype=torch.bool, device=e.device)
        e.masked_fill_(~keep.view(-1, 1), 0.0)
