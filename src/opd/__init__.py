"""opd: on-policy distillation of large language models."""

from opd.runtime import configure_hub_kernels as _configure_hub_kernels

_configure_hub_kernels()  # before any model exists: transformers' hub kernels stay off unless asked
