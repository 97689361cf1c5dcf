"""Automatic mixed precision on mps_ext.

``torch.autocast("mps_ext")`` runs matmuls and convolutions in float16 (the
default, as on MPS and CUDA) or bfloat16, precision-sensitive ops in float32
(torch's shared autocast op lists, registered for the AutocastPrivateUse1
dispatch key in ``csrc/aten/Autocast.cpp``). ``torch.amp.GradScaler("mps_ext")``
scales losses with CPU's ``_amp_*`` kernels running on device memory.
"""

import torch


def get_amp_supported_dtype() -> list[torch.dtype]:
    """The dtypes ``torch.autocast("mps_ext", dtype=...)`` accepts (torch asks
    the backend module for this list)."""
    return [torch.float16, torch.bfloat16]
