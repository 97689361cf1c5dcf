"""Device class for PyTorch's own test files, through TORCH_TEST_DEVICES.

    TORCH_TEST_DEVICES=/path/to/torch_mps_ext/tests/mps_ext_test_base.py \
    PYTORCH_TESTING_DEVICE_ONLY_FOR=privateuse1 python test_ops.py ...

torch.testing._internal.common_device_type runs this file (runpy, with its
own globals, so PrivateUse1TestBase is defined here) when it is imported,
and adds TEST_CLASS to the device types it instantiates tests for. Importing
torch_mps_ext here registers the backend first, so this works without the
torch.backends autoload entry point (no install needed, only PYTHONPATH).
Not a test module: pytest does not collect it (no test_ prefix).
"""

import torch_mps_ext  # noqa: F401

# If the backend was autoloaded by `import torch`, the base is listed
# already: move it here so it is not instantiated twice.
if PrivateUse1TestBase in device_type_test_bases:  # noqa: F821
    device_type_test_bases.remove(PrivateUse1TestBase)  # noqa: F821
TEST_CLASS = PrivateUse1TestBase  # noqa: F821
