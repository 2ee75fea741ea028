"""Dense-prediction tests need MMDetection / MMSegmentation and the full
mmcv (``make install-dense``); they skip, saying so, where those do not
import."""
import importlib.util
import os.path as osp

import pytest


def _reason():
    try:
        import mmdet.models  # noqa: F401
        import mmseg.models  # noqa: F401
    except Exception as error:  # mmdet asserts its mmcv range at import
        return (f'mmdet / mmseg with the full mmcv do not import ({error}); '
                'run `make install-dense`')
    if importlib.util.find_spec('mmcv._ext') is None:
        return 'mmcv has no compiled ops; run tools/install_mmcv.sh'
    return None


REASON = _reason()


def pytest_collection_modifyitems(config, items):
    if REASON is None:
        return
    here = osp.dirname(osp.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here) and \
                'no_toolbox' not in item.keywords:
            item.add_marker(pytest.mark.skip(reason=REASON))


@pytest.fixture(scope='session')
def canvas_root(tmp_path_factory):
    """A tiny canvas set: 8 train and 4 val canvases of 96 px."""
    from moe_plugin.datasets import prepare_digit_canvas
    root = str(tmp_path_factory.mktemp('canvas') / 'digit_canvas')
    return prepare_digit_canvas(root, num_train=8, num_val=4)['root']


@pytest.fixture(scope='session')
def dense_vit_checkpoint(tmp_path_factory):
    """An MMPretrain dense ViT classifier checkpoint (the demo's arch:
    4 blocks of 64 dims, patch 8, 32 px)."""
    import torch
    from mmpretrain.registry import MODELS

    import moe_plugin  # noqa: F401
    torch.manual_seed(0)
    model = MODELS.build(
        dict(type='ImageClassifier',
             backbone=dict(type='VisionTransformer',
                           arch=dict(embed_dims=64, num_layers=4,
                                     num_heads=4, feedforward_channels=128),
                           img_size=32, patch_size=8,
                           layer_cfgs=dict(act_cfg=dict(
                               type='GELU', approximate='tanh'))),
             head=dict(type='VisionTransformerClsHead', num_classes=10,
                       in_channels=64)))
    model.init_weights()
    path = tmp_path_factory.mktemp('dense') / 'dense_vit.pth'
    torch.save({'state_dict': model.state_dict()}, str(path))
    return str(path)


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'no_toolbox: runs without mmdet / mmseg / the full mmcv')


@pytest.fixture(autouse=True)
def restore_default_scope():
    """A runner makes 'mmdet' / 'mmseg' the current registry scope for the
    whole process; later MMPretrain builds would look up their types there.
    Restore the scopes after each test."""
    from mmengine.registry import DefaultScope
    saved = DefaultScope._instance_dict.copy()
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
