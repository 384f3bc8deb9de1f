"""Packaging: everything is declared in pyproject.toml except the package list, which must also hold
``tmpo.conf`` -- the Hydra configs, kept at the repository root as ``conf/`` and shipped inside the
package (``package-dir`` maps ``tmpo.conf`` to ``conf/``), so a plain ``pip install .`` runs from any
directory (``tmpo.config.config_dir`` finds ``tmpo/conf`` in an installed wheel, ``conf/`` in a checkout).
"""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["tmpo*", "baselines*"], exclude=["*__pycache__*"]), "tmpo.conf"])
