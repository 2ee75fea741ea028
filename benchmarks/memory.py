"""Memory the benchmarks report: the activations saved for the backward."""
import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def saved_bytes(record: list, model: nn.Module):
    """Append to ``record`` the bytes of the distinct storages saved for the
    backward inside the block, ``model``'s parameters left out (they are
    counted in the state)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return tensor
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    record.append(sum(seen.values()))
