"""How far TreeGRPO's sibling weights are from a plain mean on the mini model (README, TreeGRPO).

    python -m experiments.treegrpo_sibling_weights [--iterations 3]

TreeGRPO weights each child's aggregate advantage by the softmax of the old log-probs among its
siblings. With per-dim-mean log-probs (eq. 49) at d = 3,072 those softmaxes are near-uniform; this
prints the range of the weights over a few TreeGRPO rollouts of the committed mini base model.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from baselines.treegrpo import sibling_log_weights
from tmpo.run import build_trainer, compose_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(compose_config([f"run_dir={d}", "logger=none", "method=treegrpo", "trainer.progress=false"]))
        weights = []
        for step in range(args.iterations):
            batch = trainer.prompts.train(trainer.cfg.prompts_per_step, np.random.default_rng(step))
            rollout = trainer.sampler.rollout(trainer.policy, [t for t, _ in batch], [m for _, m in batch], step,
                                              trainer.cfg.total_steps, torch.Generator().manual_seed(step))
            weights.append(sibling_log_weights(rollout.edge_parent, rollout.edge_log_prob_old, "logp").exp())
    w = torch.cat(weights)
    print(f"d = {rollout.latent_dim}: {w.numel()} sibling weights in [{float(w.min()):.3f}, {float(w.max()):.3f}] "
          f"(a plain mean: {1 / 3:.3f})")


if __name__ == "__main__":
    main()
