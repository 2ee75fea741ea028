"""Checks and initialisation shared by the MoE backbones."""
import numbers
from typing import Callable, List, Sequence, Union

from torch import nn

#: ``init_cfg`` types that load weights: applied after every other
#: initialisation (the children's own ``init_weights`` and the position
#: embedding's init would otherwise overwrite what they load).
LOADING_INITS = ('RecycleDenseInit', )


def check_out_indices(out_indices: Union[int, Sequence[int]],
                      num_stages: int,
                      what: str = 'blocks') -> List[int]:
    """Validate ``out_indices`` against the depth; return them non-negative.

    MMPretrain only asserts (and lets ``VisionTransformer`` take the index
    ``num_layers``, which never outputs anything); a dense-prediction head
    would then get fewer maps than it was built for.

    Args:
        out_indices (int | Sequence[int]): Indices, negative ones counting
            from the end.
        num_stages (int): Number of blocks (ViT) or stages (ConvNeXt).
        what (str): What an index counts, for the error. Defaults to
            'blocks'.

    Returns:
        list[int]: The indices in ``[0, num_stages)``, in the given order.
    """
    indices = [out_indices] if isinstance(out_indices, int) else out_indices
    if isinstance(indices, str) or not isinstance(indices, Sequence) or \
            not indices:
        raise ValueError(f'`out_indices` must be an int or a non-empty '
                         f'sequence of ints, got {out_indices!r}')
    result = []
    for index in indices:
        if (isinstance(index, bool) or not isinstance(index, numbers.Integral)
                or not -num_stages <= index < num_stages):
            raise ValueError(
                f'`out_indices` has {index!r}, but the model has '
                f'{num_stages} {what} (valid: {-num_stages}..'
                f'{num_stages - 1}); out_indices={out_indices!r}')
        result.append(int(index) % num_stages)
    if len(set(result)) != len(result):
        raise ValueError(f'`out_indices`={out_indices!r} repeats a '
                         f'{what[:-1]}')
    return result


def init_weights_loading_last(module: nn.Module,
                              parent_init: Callable[[], None]) -> None:
    """Run ``parent_init`` without the loading ``init_cfg`` entries, then
    apply those (``RecycleDenseInit``) to ``module``.

    Args:
        module (nn.Module): A ``BaseModule`` backbone with ``init_cfg``.
        parent_init (callable): Its parent class's ``init_weights`` bound to
            it (``super().init_weights``).
    """
    cfgs = module.init_cfg if isinstance(module.init_cfg, list) else (
        [module.init_cfg] if module.init_cfg else [])
    loading = [c for c in cfgs if c.get('type') in LOADING_INITS]
    if not loading:
        parent_init()
        return
    others = [c for c in cfgs if c.get('type') not in LOADING_INITS]
    module.init_cfg = others or None
    try:
        parent_init()
    finally:
        module.init_cfg = cfgs
    from mmengine.registry import WEIGHT_INITIALIZERS
    for cfg in loading:
        WEIGHT_INITIALIZERS.build(cfg)(module)
