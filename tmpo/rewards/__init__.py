"""Rewards: one protocol ``reward(samples, prompts, metadata) -> (Tensor[N], info)``."""
