"""The ``torch.backends`` entry point of torch_mps_ext.

A separate top-level module, so that a bad ``TORCH_MPS_EXT_*`` setting turns
into a warning during ``import torch`` (torch stays usable on the CPU) while
``import torch_mps_ext`` itself still raises the error.
"""

import warnings


def load() -> None:
    try:
        import torch_mps_ext  # noqa: F401
    except ValueError as e:
        warnings.warn(f"mps_ext device not loaded: {e}", RuntimeWarning, stacklevel=2)
