"""The options bundle and the checks every recycling caller shares."""
import dataclasses
import inspect

import numpy as np
import pytest
from test_recycling import moe_classifier, timm_vit

from moe_plugin.recycling import (RecyclingOptions, check_sources,
                                  recycle_backbone, select_indices)
from moe_plugin.recycling.formats import timm_to_canonical
from moe_plugin.recycling.methods import random_indices, uniform_indices


def test_options_are_frozen_with_recycle_backbones_defaults():
    options = RecyclingOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.method = 'random'
    defaults = inspect.signature(recycle_backbone).parameters
    for field in dataclasses.fields(RecyclingOptions):
        assert getattr(options, field.name) == defaults[field.name].default


def test_select_indices_follows_the_options():
    rng, reference = np.random.default_rng(4), np.random.default_rng(4)
    assert np.array_equal(
        select_indices(RecyclingOptions('random'), 64, 8, 3, rng),
        random_indices(64, 8, 3, reference))
    assert np.array_equal(
        select_indices(RecyclingOptions('uniform'), 64, 8, 3, rng),
        uniform_indices(64, 8, 3))
    with pytest.raises(ValueError, match="unknown method 'copy'"):
        select_indices(RecyclingOptions('copy'), 64, 8, 3, rng)
    with pytest.raises(ValueError, match='importance must be one of'):
        select_indices(RecyclingOptions('importance', importance='l3'), 64,
                       8, 3, rng, dict(l2=np.ones(64)))


def test_check_sources():
    target = moe_classifier().backbone
    same = timm_to_canonical(timm_vit().state_dict())
    wider = timm_to_canonical(timm_vit(dim=64, heads=4).state_dict())
    deeper = timm_to_canonical(timm_vit(depth=3).state_dict())
    check_sources(same, target)
    check_sources(wider, target, trunk=same)  # a wider dense model is fine
    with pytest.raises(ValueError, match='3 blocks, the target model 2'):
        check_sources(same, target, trunk=deeper)
    with pytest.raises(ValueError, match=r'\(width mismatch\)'):
        check_sources(wider, target, trunk=wider)
