r"""``torch.mps_ext.event``: the name ``torch.mps.event`` has on a Mac
(``torch.mps.event.Event``), for code written against MPS (issue 23, item 5:
PyTorch's test_mps.py uses it). The class is :class:`torch_mps_ext.Event`."""

from .streams import Event

__all__ = ["Event"]
