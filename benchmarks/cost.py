"""What one benchmark step must do at least: the roofline's inputs.

- ``flops``: the matmul, convolution and attention FLOPs of the step as
  torch's ``FlopCounterMode`` counts them (forward and backward; elementwise
  work is not counted, it is bandwidth).
- ``bytes``: the bytes that must cross memory at least once: the weights
  read in the forward and again in the backward, their gradients written
  once, the activations saved for the backward written once and read once,
  and with an optimizer step AdamW's read of weights, gradients and two
  moments and write of weights and moments (``7 x`` the weights).
"""
import contextlib

from memory import saved_bytes
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

#: Weight-sized tensors AdamW reads (weights, grads, 2 moments) and writes
#: (weights, 2 moments) in one step.
ADAMW_PASSES = 7


def step_cost(step, model: nn.Module, optimizer_step: bool = False,
              record_arg: bool = False) -> dict:
    """Run ``step`` once and return its ``gflop`` and ``mb`` (see above).

    Args:
        step (callable): one training step (forward and backward).
        model (nn.Module): whose parameters are the weights.
        optimizer_step (bool): the step ends with an AdamW step.
        record_arg (bool): ``step`` measures its own saved activations when
            called with a list (``benchmarks/models.py``'s steps do, so that
            only the forward is metered).
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    record = []
    meter = (contextlib.nullcontext() if record_arg else
             saved_bytes(record, model))
    with FlopCounterMode(display=False) as counter:
        with meter:
            step(record) if record_arg else step()
    total = (3 + (ADAMW_PASSES if optimizer_step else 0)) * weights
    total += 2 * record[0]
    return dict(gflop=counter.get_total_flops() / 1e9, mb=total / 1e6)
