"""What the OpInfo and module_db sweeps (test_opinfo.py, test_module_db.py)
share: the device-generic harness set-up and their environment settings."""

import os

from torch.testing._internal import common_device_type
from torch.testing._internal.common_device_type import PrivateUse1TestBase

DEVICE_TYPE = "mps_ext"


def register_privateuse1_base() -> None:
    """If torch.testing._internal.common_device_type was imported before
    mps_ext was registered (another test module imported it first), it did
    not list the PrivateUse1 base: add it."""
    if PrivateUse1TestBase not in common_device_type.device_type_test_bases:
        common_device_type.device_type_test_bases.append(PrivateUse1TestBase)


def sweep_settings(var: str, selector: str, fast_samples: int, full_samples: int):
    """(mode, selected names, max samples) from `var` (fast|full),
    `var`_`selector` (comma-separated names) and `var`_MAX_SAMPLES."""
    mode = os.environ.get(var, "fast")
    assert mode in ("fast", "full"), f"{var}={mode!r}: fast or full"
    raw = os.environ.get(f"{var}_{selector}", "")
    selected = {c.strip() for c in raw.split(",") if c.strip()}
    max_samples = int(os.environ.get(f"{var}_MAX_SAMPLES",
                                     str(fast_samples if mode == "fast" else full_samples)))
    return mode, selected, max_samples
