"""The paper's tables from training runs: run labels, run readers (local run dirs, wandb), aggregation,
tables and figures. ``python -m tmpo.results --help`` (``make tables``).

Importing this package is cheap (no torch, pandas or matplotlib): the run logger imports
:mod:`tmpo.results.labels` at start-up.
"""
