"""The kernel sources sit in the top-level kernels/ folder (no __init__.py there, so that it never
shadows HF's `kernels` package from the checkout's root); the wheel installs them as msft_fast.kernels,
beside that package's __init__ (msft_fast/kernels/__init__.py). All other metadata is in pyproject.toml."""
import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

KERNEL_SOURCES = "kernels"


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "msft_fast.kernels":
            modules += [(package, os.path.splitext(os.path.basename(path))[0], path)
                        for path in sorted(glob.glob(os.path.join(KERNEL_SOURCES, "*.py")))]
        return modules


setup(cmdclass={"build_py": BuildPy})
