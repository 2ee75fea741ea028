"""Log the routing of every MoE layer to MMEngine's visualizer backends.

The per-iteration log of :class:`~moe_plugin.models.MoEImageClassifier`
already carries each layer's dropped fraction and load CV; this hook adds,
every ``interval`` iterations, the full picture: each expert's share of the
(token, choice) pairs, the router's entropy and each auxiliary loss before
weighting, per layer, as scalars of the run's visualizer (``scalars.json``
of ``LocalVisBackend`` in ``<work_dir>/<timestamp>/vis_data/``, TensorBoard
with :class:`OptionalTensorboardVisBackend`).

Cost: nothing on the other iterations (no hook is attached to the model);
on a logging iteration one extra ``[tokens, D] x [D, E]`` router product per
sparse layer (the clean gates for the entropy) or one re-run of a soft
layer's routing weights, and a single host copy of all values.
"""
from typing import Dict, List

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmpretrain.registry import HOOKS

from moe_plugin.analysis.recording import (clean_routing_probs,
                                           find_moe_layers, router_entropy)

# Its former home; the backend lives in moe_plugin.engine.vis_backends.
from ..vis_backends import OptionalTensorboardVisBackend  # noqa: F401


@HOOKS.register_module()
class MoERoutingLoggerHook(Hook):
    """Every ``interval`` training iterations, log each MoE layer's routing.

    Scalars, for each MoE layer ``<layer>`` (its module name without
    ``backbone.``, e.g. ``layers.1.ffn``), at step = the iteration (1-based,
    as MMEngine's ``LoggerHook``):

    - ``moe/<layer>/load_<e>``: expert ``e``'s share of the (token, choice)
      pairs (sparse) or of the combine weight (soft); sums to 1.
    - ``moe/<layer>/dropped``: share of (token, choice) pairs dropped for
      lack of capacity (sparse layers).
    - ``moe/<layer>/entropy``: mean over tokens of the entropy (nats) of the
      clean routing distribution (softmax gates; soft layers: combine weight
      per expert); ``log E`` is uniform routing, 0 a hard choice.
    - ``moe/<layer>/<name>_loss``: each auxiliary loss the layer reports
      (``importance``, ``load``, ``gshard``, ``z``), unweighted.

    Args:
        interval (int): Log every ``interval`` iterations. Defaults to 50.
        per_expert_load (bool): Log the ``load_<e>`` scalars (``E`` per
            layer). Defaults to True.
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, interval: int = 50, per_expert_load: bool = True):
        if (isinstance(interval, bool) or not isinstance(interval, int)
                or interval < 1):
            raise ValueError(f'interval must be an integer >= 1, got '
                             f'{interval!r}')
        self.interval = interval
        self.per_expert_load = per_expert_load
        self._layers: Dict = {}
        self._handles: List = []
        self._entropy: Dict[str, torch.Tensor] = {}

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        self._layers = find_moe_layers(model)
        if not self._layers:
            runner.logger.warning(
                'MoERoutingLoggerHook: the model has no MoE layer; nothing '
                'to log')

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if not self._layers or not self.every_n_train_iters(
                runner, self.interval):
            return
        self._entropy = {}
        for name, layer in self._layers.items():
            self._handles.append(
                layer.register_forward_hook(self._entropy_hook(name)))

    def _entropy_hook(self, name):

        def hook(layer, args, output):
            with torch.no_grad():
                self._entropy[name] = router_entropy(
                    clean_routing_probs(layer, args[0].detach()))

        return hook

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None) -> None:
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        keys, values = [], []
        for name, layer in self._layers.items():
            metrics = layer.moe_metrics
            prefix = f'moe/{name}/'
            load = metrics.get('expert_load')
            if load is not None and self.per_expert_load:
                load = load.detach().float().reshape(-1)
                keys += [f'{prefix}load_{e}' for e in range(load.numel())]
                values.append(load)
            if 'dropped_fraction' in metrics:
                keys.append(prefix + 'dropped')
                values.append(metrics['dropped_fraction'].detach().reshape(1))
            if name in self._entropy:
                keys.append(prefix + 'entropy')
                values.append(self._entropy[name].reshape(1))
            for key in sorted(metrics):
                if key.endswith('_loss'):
                    keys.append(prefix + key)
                    values.append(metrics[key].detach().reshape(1))
        self._entropy = {}
        if not keys:
            return
        # One host copy for all values.
        numbers = torch.cat([v.float().cpu() for v in values]).tolist()
        runner.visualizer.add_scalars(
            dict(zip(keys, numbers)), step=runner.iter + 1)

    def after_train(self, runner) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
