r"""Legacy typed-storage classes of mps_ext (``torch.mps_ext.FloatStorage``...).

``Tensor.storage_type()`` and ``isinstance(t.storage(), torch.mps_ext.FloatStorage)``
look these up in the device module, by the names torch.cuda uses
(``torch.storage._dtype_to_storage_type_map``). torch derives a class's
device from its ``__module__``, so they are published as ``torch.mps_ext.*``.
Like CUDA's, they cannot be made from a host buffer or shared-memory file.
"""

import torch
from ._compat import LegacyStorage as _LegacyStorage
from ._compat import classproperty
from ._compat import dtype_to_storage_type_map as _dtype_to_storage_type_map
from ._compat import warn_typed_storage_removal as _warn_typed_storage_removal


class _MpsExtLegacyStorage(_LegacyStorage):
    @classmethod
    def from_buffer(cls, *args, **kwargs):
        _warn_typed_storage_removal()
        raise RuntimeError("from_buffer: Not available for mps_ext storage")

    @classmethod
    def _new_with_weak_ptr(cls, *args, **kwargs):
        raise RuntimeError("_new_with_weak_ptr: Not available for mps_ext storage")

    @classmethod
    def _new_shared_filename(cls, manager, obj, size, *, device=None, dtype=None):
        raise RuntimeError("_new_shared_filename: Not available for mps_ext storage")


def _storage_class(name: str, dtype: torch.dtype) -> type:
    def _dtype(cls):
        return dtype

    def public_dtype(cls):
        _warn_typed_storage_removal()
        return dtype

    return type(name, (_MpsExtLegacyStorage,), {
        "__module__": "torch.mps_ext",
        "__qualname__": name,
        "_dtype": classproperty(_dtype),
        "dtype": classproperty(public_dtype),
    })


# The quantized dtypes have no mps_ext tensors: no storage class for them.
STORAGE_CLASSES = {
    name: _storage_class(name, dtype)
    for dtype, name in _dtype_to_storage_type_map().items()
    if not name.startswith(("QInt", "QUInt"))
}

__all__ = sorted(STORAGE_CLASSES)
