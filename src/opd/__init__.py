"""opd: on-policy distillation of large language models."""

from opd.runtime import configure_hub_kernels as _configure_hub_kernels

_configure_hub_kernels()  # before any model exists: transformers' hub kernels stay off unless asked

# The version when opd runs from a source tree that is not installed (`opd --version` reads the installed
# package's metadata first); tests/test_help.py keeps it equal to pyproject.toml's.
__version__ = "0.1.0"
