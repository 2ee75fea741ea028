"""Look inside the experts: routing records, heatmaps, capacity sweeps,
FLOPs. Functions over models and tensors; the CLIs in ``tools/analysis/``
build the models and data (with :mod:`moe_plugin.analysis.loading`)."""
from .flops import count_flops
from .heatmap import ClassExpertAccumulator, class_expert_means
from .recording import (LayerRouting, RoutingRecorder, clean_routing_probs,
                        find_moe_layers, router_entropy, select_moe_layers)
from .sweep import capacity_sweep, evaluate_routing

__all__ = [
    'LayerRouting', 'RoutingRecorder', 'clean_routing_probs',
    'find_moe_layers', 'router_entropy', 'select_moe_layers', 'count_flops',
    'ClassExpertAccumulator', 'class_expert_means', 'capacity_sweep',
    'evaluate_routing'
]
