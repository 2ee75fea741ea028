import pytest
import torch
import torch.nn.functional as F
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

import moe_plugin  # noqa: F401
from moe_plugin.models import MoEImageClassifier

NUM_CLASSES = 5
WEIGHTS = dict(importance=0.1, load=0.2, gshard=0.3, z=0.4)


def build_classifier(moe_layers='every-2', aux_loss_weights=None, **moe):
    moe_cfg = dict(type='SparseMoE', num_experts=4, top_k=2)
    moe_cfg.update(moe)
    cfg = dict(
        type='MoEImageClassifier',
        backbone=dict(
            type='VisionMoE',
            arch=dict(
                embed_dims=32,
                num_layers=4,
                num_heads=2,
                feedforward_channels=64),
            img_size=32,
            patch_size=8,
            moe_layers=moe_layers,
            moe_cfg=moe_cfg),
        head=dict(
            type='VisionTransformerClsHead',
            num_classes=NUM_CLASSES,
            in_channels=32,
            loss=dict(type='CrossEntropyLoss')))
    if aux_loss_weights is not None:
        cfg['aux_loss_weights'] = aux_loss_weights
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def batch(size=4):
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(size, 3, 32, 32, generator=generator)
    labels = torch.randint(NUM_CLASSES, (size, ), generator=generator)
    samples = [DataSample().set_gt_label(int(label)) for label in labels]
    return inputs, labels, samples


def test_aux_loss_is_weighted_sum_of_layer_metrics():
    model = build_classifier(aux_loss_weights=WEIGHTS)
    assert isinstance(model, MoEImageClassifier)
    model.train()
    inputs, _, samples = batch()
    losses = model.loss(inputs, samples)

    layers = [model.backbone.layers[i].ffn for i in (1, 3)]
    expected = sum(WEIGHTS[k] * layer.moe_metrics[f'{k}_loss']
                   for layer in layers for k in WEIGHTS)
    torch.testing.assert_close(losses['loss_moe_aux'], expected)
    assert all('load_loss' in layer.moe_metrics for layer in layers)

    for i, layer in zip((1, 3), layers):
        load = layer.moe_metrics['expert_load'].numpy()
        torch.testing.assert_close(
            losses[f'moe.layers.{i}.ffn.load_cv'].item(),
            float(load.std() / load.mean()))
        assert losses[f'moe.layers.{i}.ffn.dropped'] == layer.moe_metrics[
            'dropped_fraction']
    torch.testing.assert_close(
        losses['moe_dropped'],
        sum(layer.moe_metrics['dropped_fraction'] for layer in layers) / 2)

    loss_keys = sorted(key for key in losses if 'loss' in key)
    assert loss_keys == ['loss_cls', 'loss_moe_aux']
    assert not any(losses[key].requires_grad
                   for key in losses if 'loss' not in key)
    total, log_vars = model.parse_losses(losses)
    torch.testing.assert_close(total,
                               losses['loss_cls'] + losses['loss_moe_aux'])
    assert set(log_vars) == {'loss', *losses}


def test_eval_loss_cls_and_no_load_loss():
    model = build_classifier()
    model.eval()
    inputs, labels, samples = batch()
    with torch.no_grad():
        losses = model.loss(inputs, samples)
        logits = model(inputs, mode='tensor')
        assert torch.equal(logits, model(inputs, mode='tensor'))
    torch.testing.assert_close(losses['loss_cls'],
                               F.cross_entropy(logits, labels))
    layers = [model.backbone.layers[i].ffn for i in (1, 3)]
    assert not any('load_loss' in layer.moe_metrics for layer in layers)
    torch.testing.assert_close(
        losses['loss_moe_aux'],
        sum(0.005 * layer.moe_metrics['importance_loss'] for layer in layers))


def test_every_parameter_gets_gradient_with_tiny_capacity():
    model = build_classifier(
        moe_layers='every-1', capacity_factor=0.1, capacity_multiple_of=1)
    model.train()
    inputs, _, samples = batch()
    losses = model.loss(inputs, samples)
    assert losses['moe_dropped'] > 0.5
    total, _ = model.parse_losses(losses)
    total.backward()
    missing = [
        name for name, param in model.named_parameters()
        if param.requires_grad and param.grad is None
    ]
    assert missing == []
    assert model.backbone.layers[0].ffn.router.weight.grad.abs().sum() > 0


def test_no_moe_layer_gives_zero_aux_loss():
    model = build_classifier(moe_layers=[])
    model.train()
    inputs, _, samples = batch()
    losses = model.loss(inputs, samples)
    assert losses['loss_moe_aux'].item() == 0
    assert set(losses) == {'loss_cls', 'loss_moe_aux'}


@pytest.mark.parametrize('weights, pattern', [
    (dict(importance=0.1, balance=0.1), r"key 'balance'.*'importance'"),
    (dict(load=-0.1), r"`aux_loss_weights\['load'\]` must be a number >= 0"),
    (dict(z=None), r"`aux_loss_weights\['z'\]`"),
])
def test_aux_loss_weight_errors(weights, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_classifier(aux_loss_weights=weights)
