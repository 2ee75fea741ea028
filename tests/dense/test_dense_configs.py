"""Every detection / segmentation config loads and builds its model in its
toolbox's scope; headers give the command and the expected figure."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import moe_plugin  # noqa: F401
from moe_plugin.layers import find_moe_modules

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DENSE_CONFIGS = sorted(
    osp.relpath(p, REPO_ROOT) for folder in ('det', 'seg', 'demo/dense')
    for p in glob.glob(osp.join(REPO_ROOT, 'configs', folder, '*.py')))


def test_configs_are_found():
    names = [osp.basename(p) for p in DENSE_CONFIGS]
    assert 'mask-rcnn_vmoe-b16-sfp_8xb8-100e_coco.py' in names
    assert 'mask-rcnn_sphero-b16_8xb8-100e_coco.py' in names
    assert 'upernet_vmoe-b16_8xb2-160k_ade20k-512.py' in names
    assert 'upernet_cnxmoe-t_8xb2-160k_ade20k-512.py' in names


@pytest.mark.parametrize('path', DENSE_CONFIGS)
def test_dense_config_builds(path):
    text = open(osp.join(REPO_ROOT, path)).read()
    header = ' '.join(
        line.lstrip('# ').rstrip('\\ ')
        for line in text.split('_base_')[0].splitlines())
    assert f'dist_train.sh {path}' in header
    assert 'Expected' in header
    cfg = Config.fromfile(osp.join(REPO_ROOT, path))
    assert not any('::' in base for base in cfg.get('_base_', []))
    if 'vit-p8' in path:  # the demo's dense classifier
        return
    scope = cfg.default_scope
    assert cfg.custom_imports.imports == [f'moe_plugin.{scope[2:]}']
    model_cfg = cfg.model.copy()
    model_cfg.backbone.pop('init_cfg', None)
    with DefaultScope.overwrite_default_scope(scope), torch.device('meta'):
        model = MODELS.build(model_cfg)
    has_moe = bool(find_moe_modules(model))
    assert has_moe == ('_vit-' not in path), path
    if has_moe:
        assert {'type': 'MoEAuxLossHook'} in cfg.custom_hooks
