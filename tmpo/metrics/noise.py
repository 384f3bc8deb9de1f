"""The evaluation's own noise: how much a per-image-mean metric moves between evaluation seeds.

An evaluation draws ``n`` images per test prompt from independent initial noises (``eval.seed``). With the
prompts fixed, the metric ``M = mean over prompts p and images i of f(x_pi)`` varies between seeds only
through the images, so its standard deviation over seeds is

    sd(M) = sqrt( sum_p s_p^2 / n ) / P,

``s_p^2`` the (unbiased) variance of prompt ``p``'s ``n`` scores and ``P`` the number of prompts. This is
the spread one would measure by re-running the evaluation with other seeds, read off one evaluation
(``tests/test_report.py`` compares it with real re-runs). Metrics that are not means over images
(diversity, mode coverage) have no such formula; their noise is left unknown.
"""

from __future__ import annotations

import torch
from torch import Tensor


def eval_noise(scores: Tensor, group_size: int) -> float:
    """Standard deviation over evaluation seeds of ``scores.mean()`` (formula in the module docstring).

    ``scores`` [P * n] are ordered by prompt, ``group_size`` = n consecutive images per prompt.
    Returns nan when ``n < 2`` (no within-prompt spread to read).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    if group_size < 2:
        return float("nan")
    groups = scores.view(-1, group_size)
    per_prompt_var = groups.var(dim=1, unbiased=True)
    return float(per_prompt_var.div(group_size).sum().sqrt() / groups.shape[0])
