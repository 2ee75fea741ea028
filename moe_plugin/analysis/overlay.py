"""Which patches of one image each expert took (and which were dropped).

The image goes through the config's test pipeline and the model's data
preprocessor, as in evaluation; a :class:`RoutingRecorder` records every
MoE layer. Per layer and expert the result is a mask over the patch grid:

- sparse layers: the patches the expert processed (``taken``), and those
  that chose it but found its buffer full (``dropped``: with Batch Priority
  Routing, the low-priority ones);
- Soft MoE / SpheroMoE: the share of the expert's slot inputs each patch
  contributed (dispatch weights summed over the expert's slots).

Extra tokens (the class token) are reported apart from the grid.
"""
import math
from typing import Dict, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .recording import LayerRouting, RoutingRecorder
from .sweep import model_logits


def read_image(path: str) -> None:
    """Raise ``ValueError`` naming ``path`` unless it is a readable image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise ValueError(f'cannot read the image {path!r}: {error}') from None


def prepare_image(model: nn.Module, cfg, path: str) -> Tuple[Tensor,
                                                             np.ndarray]:
    """One image through the test pipeline and the data preprocessor.

    Args:
        model (nn.Module): a classifier with a ``data_preprocessor``.
        cfg (Config): the config (its test pipeline is used).
        path (str): the image file.

    Returns:
        tuple: ``inputs [1, C, H, W]`` for the model and the RGB uint8
        ``[H, W, 3]`` picture it shows (after the pipeline's resizing).
    """
    read_image(path)
    from mmengine.dataset import Compose
    from mmengine.registry import DefaultScope
    loader_cfg = cfg.get('test_dataloader') or cfg.get('val_dataloader')
    if loader_cfg is None:
        raise ValueError('the config has no test_dataloader or '
                         'val_dataloader, whose pipeline prepares the image')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        pipeline = Compose(loader_cfg['dataset']['pipeline'])
        packed = pipeline(dict(img_path=path))
    picture = packed['inputs'].permute(1, 2, 0).numpy()
    if picture.shape[-1] == 3:
        picture = picture[..., ::-1]  # loaded as BGR (OpenCV's order)
    data = model.data_preprocessor(
        dict(inputs=[packed['inputs']], data_samples=[packed['data_samples']]),
        False)
    return data['inputs'], np.ascontiguousarray(picture)


def token_grid(model: nn.Module, tokens: int) -> Tuple[Tuple[int, int], int]:
    """The patch grid of a layer's ``tokens`` and the extra leading tokens.

    A ``VisionMoE``-like backbone's ``patch_resolution`` and
    ``num_extra_tokens`` are used when they account for the tokens;
    otherwise the tokens must form a square (a feature map's tokens).

    Returns:
        tuple: ``((rows, cols), extra)``.
    """
    backbone = getattr(model, 'backbone', model)
    resolution = getattr(backbone, 'patch_resolution', None)
    extra = getattr(backbone, 'num_extra_tokens', 0)
    if resolution is not None and math.prod(resolution) + extra == tokens:
        return tuple(resolution), extra
    side = math.isqrt(tokens)
    if side * side == tokens:
        return (side, side), 0
    raise ValueError(f'cannot lay {tokens} tokens out as a patch grid')


def expert_masks(routing: LayerRouting, extra: int) -> Dict:
    """Per-expert masks over the patches of image 0 of a record.

    Returns:
        dict: ``kind``; ``taken`` (sparse) or ``dispatch`` (soft): ``[E,
        P]`` float; ``dropped`` (token choice): ``[E, P]`` bool; and the same
        for the ``extra`` tokens under ``extra_taken`` / ``extra_dropped``
        / ``extra_dispatch`` (``[extra, E]``).
    """
    out = dict(kind=routing.kind)
    for key in ('taken', 'dropped', 'dispatch'):
        value = getattr(routing, key)
        if value is None:
            continue
        value = value[0].detach().cpu()
        out[key] = value[extra:].T.float().numpy()
        out[f'extra_{key}'] = value[:extra].float().numpy()
    return out


def image_routing(model: nn.Module, inputs: Tensor,
                  layers: Dict[str, nn.Module]):
    """Class probabilities and per-layer records of one image.

    Returns:
        tuple: ``probabilities [classes]`` and ``{name: LayerRouting}``.
    """
    with torch.no_grad(), RoutingRecorder(model, layers) as recorder:
        logits = model_logits(model, inputs)
        records = dict(recorder.last)
    return logits.softmax(-1)[0], records
