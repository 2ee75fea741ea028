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


def random_words32(shape, device=None, generator=None) -> Tensor:
    """Uniform random 32-bit words, ``int32`` of the given shape.

    Drawn 64 bits at a time (``random_`` over the full ``int64`` range, then
    viewed as two ``int32``): on a CPU torch's generator costs about the same
    per call whatever the width, so this takes half the calls of
    ``torch.rand`` for the same number of values. Reproducible under
    :func:`torch.manual_seed` like any other draw.

    Args:
        shape (tuple): output shape.

    Returns:
        Tensor: ``int32`` of ``shape``, each value uniform over
        ``[-2**31, 2**31)``.
    """
    count = math.prod(shape)
    words = torch.empty((count + 1) // 2, dtype=torch.int64, device=device)
    words.random_(-2**63, None, generator=generator)
    return words.view(torch.int32)[:count].view(shape)


class ExpertDropout(nn.Dropout):
    """Dropout whose CPU path draws its mask from 32-bit random words.

    Same distribution as :class:`torch.nn.Dropout`: each element is kept
    with probability ``1 - p`` (to within ``2**-32``; ``torch.rand`` itself
    resolves ``2**-24``) and scaled by ``1 / (1 - p)``. On a CPU torch's
    ``bernoulli_`` costs about 3.5x ``torch.rand`` and ``torch.rand`` about
    1.7x :func:`random_words32` (``benchmarks/soft_kernels.py``), which
    matters for the large expert activations of soft MoE layers (e.g. 98
    experts x 768 hidden units per slot). On other devices and under
    ``torch.compile`` it is ``F.dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        # torch.compile draws its own random numbers (and cannot trace the
        # int64 -> int32 view).
        if x.device.type != 'cpu' or torch.compiler.is_compiling():
            return F.dropout(x, self.p, True, self.inplace)
        return x * self.keep_scale(random_words32(x.shape), x.dtype)

    def keep_scale(self, words: Tensor, dtype: torch.dtype) -> Tensor:
        """``1 / (1 - p)`` where a word falls in the kept ``1 - p`` of the
        32-bit range, 0 elsewhere.

        Args:
            words (Tensor): ``int32`` words from :func:`random_words32`.
            dtype (torch.dtype): the scale's dtype.

        Returns:
            Tensor: ``words``' shape, in ``dtype``.
        """
        # As ``rand >= p`` with a 32-bit uniform ``u / 2**32``: the words are
        # ``u - 2**31``, kept where ``u >= ceil(p * 2**32)``.
        threshold = min(math.ceil(self.p * 2**32), 2**32 - 1) - 2**31
        return words.ge(threshold).to(dtype).mul_(1.0 / (1.0 - self.p))


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
