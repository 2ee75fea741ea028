"""Activation statistics of a dense ViT's MLP neurons on calibration images.

Images stream through the dense model in batches; for each chosen block only
running sums are kept: ``sum |a|``, ``sum a^2``, ``count(a > 0)`` per hidden
neuron (``[H]`` each) and, for graph partitioning, the co-activation counts
``(a > 0)^T (a > 0)`` (``[H, H]`` float64: 8 * H^2 bytes per block, 18.9 MB
for ViT-S's H = 1536). For channel selection every block also keeps
``3 * 2 * D`` sums (its MLP inputs and attention outputs). Memory does not
grow with the number of images.
"""
import os
import os.path as osp
import sys
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.webp')


class NeuronStatistics:
    """Running sums over the tokens of one block's MLP hidden activations.

    Args:
        hidden (int): ``H``.
        coactivation (bool): also count co-activations. Defaults to False.
    """

    def __init__(self, hidden: int, coactivation: bool = False):
        self.tokens = 0
        self.abs_sum = torch.zeros(hidden, dtype=torch.float64)
        self.square_sum = torch.zeros(hidden, dtype=torch.float64)
        self.active = torch.zeros(hidden, dtype=torch.float64)
        self.coactive = (
            torch.zeros(hidden, hidden, dtype=torch.float64)
            if coactivation else None)

    def update(self, activations: Tensor) -> None:
        """Add ``[..., H]`` activations (post-GELU)."""
        a = activations.detach().reshape(-1, activations.shape[-1]).to(
            torch.float64)
        self.tokens += a.shape[0]
        self.abs_sum += a.abs().sum(0)
        self.square_sum += a.square().sum(0)
        on = (a > 0).to(torch.float64)
        self.active += on.sum(0)
        if self.coactive is not None:
            self.coactive += on.t() @ on

    @property
    def nbytes(self) -> int:
        tensors = [self.abs_sum, self.square_sum, self.active]
        if self.coactive is not None:
            tensors.append(self.coactive)
        return sum(t.numel() * t.element_size() for t in tensors)

    def result(self) -> Dict[str, np.ndarray]:
        """``l1`` (mean |a|), ``l2`` (root mean square), ``freq`` (share of
        tokens with a > 0), ``coactivation`` (share of tokens where both are
        active) as numpy arrays."""
        count = max(self.tokens, 1)
        out = dict(
            l1=(self.abs_sum / count).numpy(),
            l2=(self.square_sum / count).sqrt().numpy(),
            freq=(self.active / count).numpy())
        if self.coactive is not None:
            out['coactivation'] = (self.coactive / count).numpy()
        return out


def calibrate(model: nn.Module,
              batches: Iterable[Tensor],
              blocks: Sequence[int],
              coactivation: bool = False,
              total: Optional[int] = None,
              channels: bool = False) -> Dict[int, dict]:
    """Stream images through a dense MMPretrain ``VisionTransformer``.

    Args:
        model (nn.Module): the dense backbone (``layers[i].ffn.layers[0]``
            outputs the post-activation hidden units).
        batches (Iterable[Tensor]): ``[B, 3, H, W]`` normalised images.
        blocks (Sequence[int]): the blocks to record.
        coactivation (bool): also count co-activations (of ``blocks``).
            Defaults to False.
        total (int, optional): number of images, for the progress bar.
        channels (bool): for channel selection, also record every block:
            its hidden neurons, its MLP inputs (LayerNorm-2 outputs,
            ``embed``, ``[D]``) and its attention heads' outputs (the
            projection's inputs, ``attn``, ``[D]``). Defaults to False.

    Returns:
        dict: block -> :meth:`NeuronStatistics.result`, with ``embed`` and
        ``attn`` results when ``channels``.
    """
    from mmengine.utils import ProgressBar
    hidden, handles, extra = {}, [], {}
    recorded = sorted(set(blocks) | (set(range(len(model.layers)))
                                     if channels else set()))

    def record(stat):
        return lambda module, args, out: stat.update(out)

    for block in recorded:
        layer = model.layers[block]
        fc1 = layer.ffn.layers[0]
        hidden[block] = NeuronStatistics(fc1[0].out_features, coactivation
                                         and block in blocks)
        handles.append(fc1.register_forward_hook(record(hidden[block])))
        if channels:
            width = layer.ln2.normalized_shape[0]
            extra[block] = dict(embed=NeuronStatistics(width),
                                attn=NeuronStatistics(width))
            handles.append(
                layer.ln2.register_forward_hook(record(
                    extra[block]['embed'])))
            handles.append(
                layer.attn.proj.register_forward_pre_hook(
                    lambda module, args, s=extra[block]['attn']: s.update(
                        args[0])))
    # On stderr: stdout is the tools' summary.
    bar = ProgressBar(total, file=sys.stderr) if total else None
    model.eval()
    try:
        with torch.no_grad():
            for images in batches:
                model(images)
                if bar is not None:
                    bar.update(images.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    if bar is not None:
        print(file=sys.stderr, flush=True)
    out = {block: s.result() for block, s in hidden.items()}
    for block, parts in extra.items():
        out[block].update({k: s.result() for k, s in parts.items()})
    return out


def balanced_choice(labels: Sequence[int], num_images: int, seed: int,
                    num_classes: Optional[int] = None) -> List[int]:
    """Indices of ``num_images`` samples spread evenly over the classes,
    drawn at random (seeded) inside each class.

    Args:
        labels (Sequence[int]): class of every sample.
        num_images (int): how many to take.
        seed (int): random seed.
        num_classes (int, optional): classes the data must cover; an error
            if it has fewer. Defaults to None (no check).

    Returns:
        list[int]: sample indices, class by class.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if num_classes is not None and len(classes) < num_classes:
        raise ValueError(
            f'calibration data has {len(classes)} classes, fewer than the '
            f'{num_classes} asked for')
    if num_images < 1:
        raise ValueError(f'num_calib_images must be >= 1, got {num_images}')
    rng = np.random.default_rng(seed)
    per_class = [num_images // len(classes)] * len(classes)
    for i in range(num_images % len(classes)):
        per_class[i] += 1
    chosen = []
    for cls, count in zip(classes, per_class):
        members = np.flatnonzero(labels == cls)
        take = min(count, len(members))
        chosen.extend(rng.choice(members, take, replace=False).tolist())
    return chosen


def image_folder_samples(root: str):
    """``(path, class index)`` of ``root/<class>/<image>``, sorted."""
    if not osp.isdir(root):
        raise ValueError(f'calibration folder {root!r} does not exist')
    classes = sorted(d for d in os.listdir(root)
                     if osp.isdir(osp.join(root, d)))
    samples = []
    for label, cls in enumerate(classes):
        for name in sorted(os.listdir(osp.join(root, cls))):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                samples.append((osp.join(root, cls, name), label))
    if not samples:
        raise ValueError(f'no images in {root!r} (expected '
                         'root/<class>/<image>)')
    return samples


def load_image(path: str, size: int, mean: Sequence[float],
               std: Sequence[float]) -> Tensor:
    """RGB image, shorter side resized to ``size``, centre crop, normalised:
    ``[3, size, size]``."""
    from PIL import Image
    img = Image.open(path).convert('RGB')
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)),
                      max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1)


def folder_batches(samples, indices, size, mean, std, batch_size=32):
    """Batches of normalised images of ``samples[indices]``."""
    for start in range(0, len(indices), batch_size):
        yield torch.stack([
            load_image(samples[i][0], size, mean, std)
            for i in indices[start:start + batch_size]
        ])


def build_dense_vit(dense,
                    backbone: nn.Module,
                    num_heads: Optional[int] = None) -> nn.Module:
    """MMPretrain's ``VisionTransformer`` holding the dense weights, with
    the target backbone's image size, the checkpoint's image channels (1
    for grey images), and the target's heads unless ``num_heads`` (a wider
    dense model) is given (exact GELU, as timm and MMPretrain ViTs)."""
    from mmpretrain.models import VisionTransformer
    model = VisionTransformer(
        arch=dict(
            embed_dims=dense.embed_dims,
            num_layers=dense.num_layers,
            num_heads=num_heads or backbone.layers[0].attn.num_heads,
            feedforward_channels=dense.feedforward_channels),
        img_size=backbone.img_size,
        patch_size=dense.patch_size,
        in_channels=dense.in_channels,
        with_cls_token='cls_token' in dense.state,
        final_norm='ln1.weight' in dense.state,
        out_type='raw' if 'cls_token' not in dense.state else 'cls_token',
        norm_cfg=dict(type='LN', eps=1e-6))
    missing, unexpected = model.load_state_dict(dense.state, strict=False)
    missing = [k for k in missing if not k.startswith('ln2')]
    if missing:
        raise ValueError(f'dense checkpoint lacks {missing[:5]} for '
                         'calibration')
    model.eval()  # MMPretrain's ViT.train() does not return the module
    return model


def dataset_config_batches(config: str, num_images: int, seed: int,
                           num_classes: Optional[int] = None,
                           batch_size: int = 32):
    """``(batches, count)`` from an MMPretrain config's training set, read
    with its test pipeline (no augmentation), class balanced."""
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmpretrain.registry import DATASETS, MODELS
    cfg = Config.fromfile(config)
    dataset_cfg = cfg.train_dataloader.dataset.copy()
    dataset_cfg.pipeline = cfg.test_dataloader.dataset.pipeline
    dataset = DATASETS.build(dataset_cfg)
    preprocessor_cfg = dict(type='ClsDataPreprocessor')
    preprocessor_cfg.update(cfg.get('data_preprocessor', {}))
    preprocessor = MODELS.build(preprocessor_cfg)
    indices = balanced_choice(dataset.get_gt_labels(), num_images, seed,
                              num_classes)

    def batches():
        for start in range(0, len(indices), batch_size):
            data = pseudo_collate(
                [dataset[i] for i in indices[start:start + batch_size]])
            yield preprocessor(data, False)['inputs']

    return batches(), len(indices)
