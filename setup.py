# The top-level kernels/ folder ships as the subpackage cpmtool.kernels (DESIGN.md layout);
# pyproject's static `packages.find` cannot remap a folder's subpackages, so list them here.
from setuptools import find_packages, setup

kernel_pkgs = ["cpmtool.kernels"] + [f"cpmtool.kernels.{p}" for p in find_packages("kernels")]
setup(
    packages=find_packages(include=["cpmtool", "cpmtool.*"]) + kernel_pkgs,
    package_dir={"cpmtool.kernels": "kernels"},
)
