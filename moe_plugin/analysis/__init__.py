"""Look inside the experts: routing records, heatmaps, capacity sweeps,
FLOPs. Pure functions over models and tensors; the CLIs in
``tools/analysis/`` build the models and data."""
from .recording import (LayerRouting, RoutingRecorder, clean_routing_probs,
                        find_moe_layers, router_entropy, select_moe_layers)

__all__ = [
    'LayerRouting', 'RoutingRecorder', 'clean_routing_probs',
    'find_moe_layers', 'router_entropy', 'select_moe_layers'
]
