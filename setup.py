"""Packages of the wheel: ``orchestrator`` and the ``hydra_plugins`` namespace (found), plus the
Hydra configs, which live at the top level in ``conf/`` and ship as the package ``orchestrator.conf``
(``orchestrator/cli.py`` loads them from there: ``config_path="conf"``). Everything else is in
pyproject.toml."""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=find_packages(include=["orchestrator", "orchestrator.*"])
    + find_namespace_packages(include=["hydra_plugins", "hydra_plugins.*"])
    + ["orchestrator.conf"],
    package_dir={"orchestrator.conf": "conf"},
)
