"""Evaluation metrics: sample diversity (LGMD, cosine diversity)."""

from tmpo.metrics.diversity import cosine_diversity, lgmd

__all__ = ["cosine_diversity", "lgmd"]
