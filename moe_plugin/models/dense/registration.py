"""Our models in MMDetection's and MMSegmentation's ``MODELS`` registries.

A detector config is built in the ``mmdet`` scope: MMEngine looks a type up
in ``mmdet``'s registry (then the root's), never in MMPretrain's, and every
nested build inside a backbone (norm layers such as ``LN2d``, MoE layers)
also happens in that scope. So each class is registered there as a
subclass of the same name whose construction runs in the ``mmpretrain``
scope; parameters and ``isinstance`` are the class's own. Our hooks
(``MoEAuxLossHook``, ``ExpertParallelHook``, ``MoERoutingLoggerHook``,
``RandomStateHook``, ``PortableCheckpointHook``, which ``tools/train.py``
adds to every run), the expert-parallel wrapper
(``MoEDistributedDataParallel``) and ``OptionalTensorboardVisBackend`` go
into their ``HOOKS``, ``MODEL_WRAPPERS`` and ``VISBACKENDS`` as they are.
Registration happens only for the packages that import.
"""
import importlib
import importlib.util
from typing import Dict, Optional

from mmengine.registry import DefaultScope

#: The dense-prediction toolboxes, the extra that installs each and its
#: registry module.
TOOLBOXES = {
    'mmdet': dict(extra='det', name='MMDetection 3.3'),
    'mmseg': dict(extra='seg', name='MMSegmentation 1.2'),
}

#: Why a toolbox could not be registered into (its import error), by scope.
UNAVAILABLE: Dict[str, str] = {}


def _model_classes() -> list:
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS

    from ..backbones import ConvNeXtMoE, VisionMoE
    from ..builder import MOE_LAYER_TYPES
    from ..necks import MoENeck
    from .vision_moe_pyramid import VisionMoEPyramid
    layers = [PRETRAIN_MODELS.get(name) for name in MOE_LAYER_TYPES]
    return [VisionMoE, VisionMoEPyramid, ConvNeXtMoE, MoENeck
            ] + [cls for cls in layers if cls is not None]


def in_pretrain_scope(cls: type) -> type:
    """A subclass of ``cls`` built in the ``mmpretrain`` registry scope.

    Args:
        cls (type): A module class of MMPretrain's registry.

    Returns:
        type: Same name, same parameters; ``__init__`` runs under
        ``DefaultScope.overwrite_default_scope('mmpretrain')``.
    """

    def __init__(self, *args, **kwargs):
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls, ), {
        '__init__': __init__,
        '__doc__': cls.__doc__,
        '__module__': cls.__module__,
        '__qualname__': cls.__qualname__,
    })


def _hook_classes() -> list:
    from ...engine.hooks import (ExpertParallelHook, MoEAuxLossHook,
                                 MoERoutingLoggerHook, PortableCheckpointHook,
                                 RandomStateHook)
    return [
        MoEAuxLossHook, ExpertParallelHook, MoERoutingLoggerHook,
        RandomStateHook, PortableCheckpointHook
    ]


def _engine_classes() -> tuple:
    """The model wrappers and the visualisation backends."""
    from ...engine.model_wrapper import MoEDistributedDataParallel
    from ...engine.vis_backends import OptionalTensorboardVisBackend
    return [MoEDistributedDataParallel], [OptionalTensorboardVisBackend]


def _import_registry(scope: str):
    """The scope's registry module, or None with the reason recorded."""
    try:
        module = importlib.import_module(f'{scope}.registry')
    except (ImportError, AssertionError) as error:
        # mmdet / mmseg assert their mmcv range at import.
        UNAVAILABLE[scope] = f'{type(error).__name__}: {error}'
        return None
    UNAVAILABLE.pop(scope, None)
    return module


def register_dense_models(scope: Optional[str] = None) -> Dict[str, list]:
    """Register the MoE backbones, necks, layers and hooks for dense
    prediction.

    Registering twice is a no-op.

    Args:
        scope (str, optional): ``'mmdet'`` or ``'mmseg'``. Defaults to None
            (each of them that imports).

    Returns:
        dict: Scope -> class names registered there (scopes that do not import
        are left out; :data:`UNAVAILABLE` says why).
    """
    scopes = list(TOOLBOXES) if scope is None else [scope]
    done = {}
    for name in scopes:
        registries = _import_registry(name)
        if registries is None:
            continue
        names = []
        wrappers, vis_backends = _engine_classes()
        pairs = ((registries.MODELS, _model_classes(), in_pretrain_scope),
                 (registries.HOOKS, _hook_classes(), None),
                 (registries.MODEL_WRAPPERS, wrappers, None),
                 (registries.VISBACKENDS, vis_backends, None))
        for registry, classes, wrap in pairs:
            for cls in classes:
                current = registry.module_dict.get(cls.__name__)
                if current is None:
                    registry.register_module(
                        module=wrap(cls) if wrap else cls)
                elif not issubclass(current, cls):
                    raise KeyError(f'{cls.__name__} is already registered in '
                                   f'{name} as {current!r}')
                names.append(cls.__name__)
        done[name] = names
    return done


def require(scope: str) -> None:
    """Raise ``ImportError`` with the fix when a toolbox cannot run.

    Checks that ``scope`` (``'mmdet'`` or ``'mmseg'``) imports and that
    mmcv has its compiled ops (``mmcv.ops``, which their models import;
    mmcv-lite has none).

    Args:
        scope (str): ``'mmdet'`` or ``'mmseg'``.
    """
    if scope not in TOOLBOXES:
        raise ValueError(f'scope must be one of {list(TOOLBOXES)}, got '
                         f'{scope!r}')
    info = TOOLBOXES[scope]
    fix = (f"install the full mmcv 2.1 first (`tools/install_mmcv.sh`, or "
           f"`mim install 'mmcv>=2.0.0rc4,<2.2'` with CUDA), then "
           f"`pip install -e '.[{info['extra']}]'` (or `make install-dense`)")
    if _import_registry(scope) is None:
        raise ImportError(f"{info['name']} ({scope}) is needed for "
                          f"{info['name'].split()[0]} configs but does not "
                          f'import ({UNAVAILABLE[scope]}): {fix}')
    if importlib.util.find_spec('mmcv._ext') is None:
        raise ImportError(
            f"{info['name']} needs mmcv's compiled ops (mmcv.ops), but the "
            f'installed mmcv has none (mmcv-lite?): {fix}')
    register_dense_models(scope)
