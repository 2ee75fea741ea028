"""Batched MLP experts: E independent MLPs run as two batched matmuls."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The activations of the FFNs and experts by name, as ``nn.GELU``'s
#: ``approximate``: V-MoE (flax's ``nn.gelu``) uses the tanh approximation,
#: MMPretrain, timm, DeiT and MoE Jetpack the exact (erf) GELU.
GELU_APPROXIMATIONS = {'gelu_tanh': 'tanh', 'gelu': 'none'}


class ExpertDropout(nn.Dropout):
    """Dropout whose CPU path draws its mask with ``rand_like >= p``.

    Same distribution as :class:`torch.nn.Dropout` (each element kept with
    probability ``1 - p`` and scaled by ``1 / (1 - p)``), but on a CPU
    ``bernoulli_`` costs about 2.5x more than ``rand_like``, which matters
    for the large expert activations of soft MoE layers (e.g. 98 experts x
    768 hidden units per slot). On other devices it is ``F.dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != 'cpu':
            return F.dropout(x, self.p, True, self.inplace)
        # The mask is built in place in the uniform draws' buffer (no bool
        # tensor, no conversion): the same draws, the same mask.
        scale = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * scale


def gelu_approximation(act: str, name: str = 'act') -> str:
    """``nn.GELU``'s ``approximate`` for an activation name.

    Args:
        act (str): 'gelu_tanh' (flax's ``nn.gelu``, V-MoE) or 'gelu'
            (exact erf).
        name (str): how the error message names the setting.
            Defaults to 'act'.

    Returns:
        str: 'tanh' or 'none'.
    """
    if act not in GELU_APPROXIMATIONS:
        raise ValueError(
            f'{name} must be one of {sorted(GELU_APPROXIMATIONS)}, '
            f'got {act!r}')
    return GELU_APPROXIMATIONS[act]


def act_name(act_cfg: dict) -> Optional[str]:
    """The experts' ``act`` name of an MMCV activation config, e.g.
    ``dict(type='GELU', approximate='tanh')`` -> 'gelu_tanh'; None for an
    activation the experts do not have."""
    if act_cfg.get('type') != 'GELU':
        return None
    approximate = act_cfg.get('approximate', 'none')
    for name, value in GELU_APPROXIMATIONS.items():
        if value == approximate:
            return name
    return None


def build_activation(act: str) -> nn.Module:
    """``nn.GELU`` for 'gelu_tanh' or 'gelu' (:func:`gelu_approximation`)."""
    return nn.GELU(approximate=gelu_approximation(act))


class BatchedExperts(nn.Module):
    """E MLP experts ``Dense -> act -> Dropout -> Dense -> Dropout``.

    Weights are stacked (``w1 [E, D, H]``, ``b1 [E, H]``, ``w2 [E, H, D]``,
    ``b2 [E, D]``) so all experts run as one ``baddbmm`` per layer. The
    matmul covers the whole buffer, so every expert is in the autograd graph
    even when it received no token (DDP needs no ``find_unused_parameters``).

    Args:
        num_experts (int): ``E``.
        embed_dims (int): ``D``.
        hidden_dims (int): ``H``.
        act (str): 'gelu_tanh' or 'gelu'. Defaults to 'gelu_tanh'.
        drop (float): dropout after the activation and after the output
            (V-MoE's expert ``dropout_rate``). Defaults to 0.
    """

    def __init__(self,
                 num_experts: int,
                 embed_dims: int,
                 hidden_dims: int,
                 act: str = 'gelu_tanh',
                 drop: float = 0.0):
        super().__init__()
        if not 0.0 <= drop < 1.0:
            raise ValueError(f'expert dropout must be in [0, 1), got {drop}')
        self.w1 = nn.Parameter(torch.empty(num_experts, embed_dims,
                                           hidden_dims))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dims))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dims,
                                           embed_dims))
        self.b2 = nn.Parameter(torch.empty(num_experts, embed_dims))
        self.act = build_activation(act)
        self.drop = ExpertDropout(drop)
        #: Set by :func:`~moe_plugin.layers.expert_parallel.shard_experts`
        #: when this rank holds only some of the experts.
        self.expert_shard = None
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier-uniform kernels per expert, N(0, 1e-6) biases (vmoe)."""
        for weight in (self.w1, self.w2):
            fan_in, fan_out = weight.shape[1:]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            nn.init.uniform_(weight, -bound, bound)
        for bias in (self.b1, self.b2):
            nn.init.normal_(bias, std=1e-6)

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """``[E, C, D] -> [E, C, D]``, expert ``e`` applied to ``x[e]``.

        With expert parallelism the buffer of all ``E`` experts is exchanged
        so that this rank's experts run on every rank's slots.
        """
        if self.expert_shard is not None:
            return self.expert_shard.run(self.compute, x)
        return self.compute(x)

    def compute(self, x: Tensor) -> Tensor:
        """The experts held here on their slots, ``[E_local, C, D]``."""
        h = torch.baddbmm(self.b1.unsqueeze(1), x, self.w1)
        h = self.drop(self.act(h))
        return self.drop(torch.baddbmm(self.b2.unsqueeze(1), h, self.w2))
