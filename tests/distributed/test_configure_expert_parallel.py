"""The config switch of expert parallelism (no process group needed)."""
import pytest
from mmengine.config import Config

from moe_plugin.engine import configure_expert_parallel


def make_cfg(**moe):
    return Config(dict(model=dict(
        type='MoEImageClassifier',
        backbone=dict(type='VisionMoE',
                      moe_cfg=dict(type='SparseMoE', **moe)))))


def test_without_ep_the_config_is_unchanged():
    for cfg in (make_cfg(), make_cfg(expert_parallel=False),
                make_cfg(expert_parallel=0)):
        before = cfg.to_dict()
        assert configure_expert_parallel(cfg) is False
        assert cfg.to_dict() == before


@pytest.mark.parametrize('value', [True, 2])
def test_ep_picks_the_wrapper_and_the_hook(value):
    cfg = make_cfg(expert_parallel=value)
    cfg.custom_hooks = [dict(type='RandomStateHook')]
    assert configure_expert_parallel(cfg) is True
    assert cfg.model_wrapper_cfg == dict(type='MoEDistributedDataParallel')
    assert [h['type'] for h in cfg.custom_hooks] == [
        'RandomStateHook', 'ExpertParallelHook']
    # Idempotent.
    configure_expert_parallel(cfg)
    assert len(cfg.custom_hooks) == 2


def test_ep_with_plain_ddp_is_refused():
    cfg = make_cfg(expert_parallel=True)
    cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel')
    with pytest.raises(ValueError, match="needs model_wrapper_cfg type="
                       "'MoEDistributedDataParallel'.*got "
                       "'MMDistributedDataParallel'"):
        configure_expert_parallel(cfg)


def test_custom_hooks_that_are_not_a_list_are_refused():
    cfg = make_cfg(expert_parallel=True)
    cfg.custom_hooks = "[dict(type='RandomStateHook')]"  # via --cfg-options
    with pytest.raises(ValueError, match='custom_hooks must be a list of hook'
                       " configs, got \"\\[dict\\(type='RandomStateHook'"):
        configure_expert_parallel(cfg)
