"""Policies: the :class:`FlowPolicy` interface and its backends (toy, ...)."""

from tmpo.policies.base import FlowPolicy

__all__ = ["FlowPolicy"]
