"""Pure-PyTorch MoE building blocks (no registry, no MMEngine)."""
from .aux_loss import (DEFAULT_AUX_LOSS_WEIGHTS, check_aux_loss_weights,
                       find_moe_modules, moe_losses)
from .base import MoELayer, is_moe_layer
from .dispatch import (IndexDispatcher, expert_choice_dispatcher,
                       token_choice_dispatcher)
from .experts import (GELU_APPROXIMATIONS, BatchedExperts, build_activation,
                      gelu_approximation)
from .reference import (einsum_sparse_moe_forward, einsum_top_k_combine,
                        einsum_top_k_forward)
from .routing import (NoisyTopExpertsPerItem, NoisyTopItemsPerExpert,
                      TopKAssignment, assign_top_k, compute_capacity,
                      gshard_loss, importance_loss, load_loss, z_loss)
from .soft_moe import SoftMoE
from .sparse_moe import SparseMoE, set_eval_routing
from .sphero_moe import SpheroMoE

__all__ = [
    'MoELayer', 'is_moe_layer', 'GELU_APPROXIMATIONS', 'gelu_approximation',
    'IndexDispatcher', 'token_choice_dispatcher', 'expert_choice_dispatcher',
    'BatchedExperts', 'build_activation', 'NoisyTopExpertsPerItem',
    'NoisyTopItemsPerExpert', 'TopKAssignment', 'assign_top_k',
    'compute_capacity', 'importance_loss', 'load_loss', 'gshard_loss',
    'z_loss', 'SparseMoE', 'SoftMoE', 'SpheroMoE', 'set_eval_routing',
    'einsum_top_k_combine', 'einsum_top_k_forward',
    'einsum_sparse_moe_forward', 'DEFAULT_AUX_LOSS_WEIGHTS',
    'check_aux_loss_weights', 'find_moe_modules', 'moe_losses'
]
