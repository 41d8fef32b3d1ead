"""Training statistics logged without a host sync each: collected as device tensors, read once per iteration.

detectron2's heads call `.item()` (or `nonzero()`) for every statistic they log, and each call waits for the
GPU to finish everything queued so far. Our heads call `put_scalars`; inside `deferred_scalars()` (the fast
training loop) the values stay on the device and are copied to the host together with the losses, in one
transfer at the end of the step. Outside it they are written at once, like detectron2's. A NaN value means "nothing to log this time" (e.g. a
foreground ratio without foreground), which a head can say without reading the count first.
"""

import math
import contextlib
import threading

import torch
from detectron2.utils.events import get_event_storage

_pending = threading.local()


def put_scalars(**values):
    """Log scalar tensors (or numbers) to the current EventStorage, deferred when a collection is open;
    NaN values are not logged."""
    collected = getattr(_pending, "scalars", None)
    if collected is not None:
        collected.update(values)
        return
    write_scalars(to_host(values))


def write_scalars(values):
    """Put {name: float} in the current EventStorage, leaving out NaN values."""
    storage = get_event_storage()
    for name, value in values.items():
        if not math.isnan(value):
            storage.put_scalar(name, value)


@contextlib.contextmanager
def deferred_scalars():
    """Collect put_scalars calls made inside; yields the dict {name: tensor or number} to log later."""
    previous = getattr(_pending, "scalars", None)
    _pending.scalars = {}
    try:
        yield _pending.scalars
    finally:
        _pending.scalars = previous


def to_host(tensors):
    """{name: float} of scalar tensors (and numbers), with one device-to-host copy for all tensors."""
    names = [name for name, value in tensors.items() if isinstance(value, torch.Tensor)]
    values = {name: float(value) for name, value in tensors.items() if not isinstance(value, torch.Tensor)}
    if names:
        stacked = torch.stack([tensors[name].detach().float().reshape(()) for name in names]).cpu().tolist()
        values.update(zip(names, stacked))
    return values
