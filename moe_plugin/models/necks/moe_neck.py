"""A neck of pre-LN residual MoE blocks: an MoE stage for any backbone."""
from functools import partial
from typing import Optional, Sequence, Tuple, Union

import torch.nn as nn
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule, ModuleList
from mmpretrain.registry import MODELS
from timm.layers import AttentionPoolLatent
from torch import Tensor

from ..builder import build_moe_layer

#: Pooling modes of :class:`MoENeck`; None keeps the map (dense
#: prediction).
POOL_TYPES = ('gap', 'token', 'map', None)


class MoENeckBlock(BaseModule):
    """``x + drop_path(MoE(LN(x)))`` over tokens of shape (B, N, D).

    Args:
        embed_dims (int): Token dimension ``D``.
        moe (nn.Module): The MoE layer, ``forward(x: [B, N, D]) -> [B, N, D]``
            without the residual.
        drop_path_rate (float): Stochastic depth rate of the MoE branch.
            Defaults to 0.
        norm_eps (float): LayerNorm epsilon. Defaults to 1e-6.
    """

    def __init__(self,
                 embed_dims: int,
                 moe: nn.Module,
                 drop_path_rate: float = 0.,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.ln = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.moe = moe
        self.drop_path = (DropPath(drop_path_rate)
                          if drop_path_rate > 0 else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to tokens of shape (B, N, D)."""
        return x + self.drop_path(self.moe(self.ln(x)))


@MODELS.register_module()
class MoENeck(BaseModule):
    """MoE blocks over a backbone's last output, then pooling.

    The last element of the backbone's output tuple is either a feature map
    (B, C, H, W), taken as ``H * W`` tokens, or tokens (B, N, C) (e.g. a ViT
    with ``out_type='raw'``). An optional linear projection maps ``C =
    in_channels`` to ``embed_dims``; ``num_blocks`` pre-LN residual MoE
    blocks ``x + MoE(LN(x))`` follow, then a final LayerNorm and pooling:

    - ``'gap'``: mean over the tokens after the first ``num_extra_tokens``.
    - ``'token'``: the first token (the backbone's class token; needs
      ``num_extra_tokens >= 1`` and token input).
    - ``'map'``: timm's ``AttentionPoolLatent`` over the tokens after the
      first ``num_extra_tokens`` (as ``VisionMoE(out_type='map')``).
    - None (dense prediction, an extra MoE stage): no pooling; the last
      feature map (B, C, H, W) is replaced by the result as a map
      (B, embed_dims, H, W) and every other level passes through, so a
      detector's ``FPN`` or a segmentor's head follows (``neck=[MoENeck,
      FPN]`` builds both in sequence).

    No position embedding is added: the backbone's features already encode
    position, and the MoE layers mix no tokens but through their routing.

    Args:
        in_channels (int): Channels ``C`` of the backbone's last output.
        embed_dims (int, optional): Width of the MoE blocks. Defaults to
            None (``in_channels``, no projection).
        num_blocks (int): Number of MoE blocks. Defaults to 1.
        moe_cfg (dict, optional): The MoE layer config (see
            :func:`~moe_plugin.models.build_moe_layer`); ``embed_dims``,
            ``feedforward_channels`` and ``num_tokens`` are filled in unless
            given. Defaults to ``dict(type='SparseMoE')``.
        feedforward_channels (int, optional): Hidden width of each expert.
            Defaults to None (``4 * embed_dims``).
        num_tokens (int, optional): Tokens per image, for layers whose slot
            count depends on it (Soft MoE's capacity factor). Defaults to
            None.
        pool (str | None): ``'gap'``, ``'token'``, ``'map'`` or None (keep
            the maps). Defaults to 'gap'.
        num_extra_tokens (int): Leading tokens of token input (class tokens)
            that ``gap`` and ``map`` leave out. Defaults to 0.
        num_heads (int): Heads of the ``map`` attention pool. Defaults to 4.
        drop_path_rate (float): Stochastic depth rate, rising linearly from 0
            at the first block to this value at the last. Defaults to 0.
        norm_eps (float): LayerNorm epsilon. Defaults to 1e-6.
        init_cfg (dict | list[dict], optional): Initialization config.
            Defaults to TruncNormal(std=0.02) for the projection.
    """

    def __init__(self,
                 in_channels: int,
                 embed_dims: Optional[int] = None,
                 num_blocks: int = 1,
                 moe_cfg: Optional[dict] = None,
                 feedforward_channels: Optional[int] = None,
                 num_tokens: Optional[int] = None,
                 pool: str = 'gap',
                 num_extra_tokens: int = 0,
                 num_heads: int = 4,
                 drop_path_rate: float = 0.,
                 norm_eps: float = 1e-6,
                 init_cfg: Union[dict, Sequence[dict], None] = dict(
                     type='TruncNormal', layer='Linear', std=.02, bias=0.)):
        super().__init__(init_cfg=init_cfg)
        for key, value in (('in_channels', in_channels),
                           ('num_blocks', num_blocks),
                           ('num_heads', num_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f'`{key}` must be a positive int, got {value!r}')
        embed_dims = in_channels if embed_dims is None else embed_dims
        if not isinstance(embed_dims, int) or embed_dims < 1:
            raise ValueError(
                f'`embed_dims` must be a positive int, got {embed_dims!r}')
        if pool not in POOL_TYPES:
            raise ValueError(
                f'`pool` must be one of {POOL_TYPES}, got {pool!r}')
        if not isinstance(num_extra_tokens, int) or num_extra_tokens < 0:
            raise ValueError(f'`num_extra_tokens` must be an int >= 0, got '
                             f'{num_extra_tokens!r}')
        if pool == 'token' and num_extra_tokens < 1:
            raise ValueError(
                "`pool='token'` takes the backbone's class token and needs "
                f'`num_extra_tokens` >= 1, got {num_extra_tokens}')
        if pool == 'map' and embed_dims % num_heads:
            raise ValueError(f'`embed_dims` ({embed_dims}) must be divisible '
                             f'by `num_heads` ({num_heads}) for map pooling')
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f'`drop_path_rate` must be in [0, 1), got '
                             f'{drop_path_rate!r}')
        self.in_channels = in_channels
        self.embed_dims = embed_dims
        self.pool = pool
        self.num_extra_tokens = num_extra_tokens
        if feedforward_channels is None:
            feedforward_channels = 4 * embed_dims

        self.proj = (nn.Linear(in_channels, embed_dims)
                     if in_channels != embed_dims else nn.Identity())
        moe_cfg = dict(type='SparseMoE') if moe_cfg is None else moe_cfg
        defaults = {} if num_tokens is None else dict(num_tokens=num_tokens)
        rates = [
            drop_path_rate * i / max(num_blocks - 1, 1)
            for i in range(num_blocks)
        ]
        self.blocks = ModuleList([
            MoENeckBlock(
                embed_dims,
                build_moe_layer(
                    moe_cfg,
                    embed_dims=embed_dims,
                    feedforward_channels=feedforward_channels,
                    **defaults),
                drop_path_rate=rate,
                norm_eps=norm_eps) for rate in rates
        ])
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps)
        if pool == 'map':
            self.attn_pool = AttentionPoolLatent(
                embed_dims,
                num_heads=num_heads,
                mlp_ratio=feedforward_channels / embed_dims,
                norm_layer=partial(nn.LayerNorm, eps=norm_eps))

    def forward(self, inputs: Union[Tensor, Tuple[Tensor, ...]]
                ) -> Tuple[Tensor, ...]:
        """Apply the MoE blocks to the last output and pool it.

        Args:
            inputs (Tensor | tuple[Tensor]): The backbone's outputs; the last
                is a feature map (B, C, H, W) or tokens (B, N, C).

        Returns:
            tuple[Tensor]: The pooled features, of shape (B, embed_dims);
            with ``pool=None`` the inputs with the last map replaced by
            the result, of shape (B, embed_dims, H, W).
        """
        levels = tuple(inputs) if isinstance(inputs,
                                             (tuple, list)) else (inputs, )
        x = levels[-1]
        if self.pool is None and x.dim() != 4:
            raise ValueError(
                '`pool=None` keeps feature maps and needs a map (B, C, H, '
                f'W) as the last input, got shape {tuple(x.shape)}')
        height, width = x.shape[-2:]
        if x.dim() == 4:
            if self.pool == 'token':
                raise ValueError(
                    "`pool='token'` needs token input (B, N, C) with a class "
                    f'token, got a feature map of shape {tuple(x.shape)}')
            channels = x.shape[1]
        elif x.dim() == 3:
            channels = x.shape[2]
        else:
            raise ValueError('MoENeck takes a feature map (B, C, H, W) or '
                             f'tokens (B, N, C), got shape {tuple(x.shape)}')
        if channels != self.in_channels:
            raise ValueError(
                f'MoENeck was built for in_channels={self.in_channels} but '
                f'got input of width {channels} (shape {tuple(x.shape)})')
        if x.dim() == 4:
            x = x.flatten(2).transpose(1, 2)
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.pool is None:
            out = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
            return levels[:-1] + (out, )
        if self.pool == 'token':
            return (x[:, 0], )
        x = x[:, self.num_extra_tokens:]
        if self.pool == 'gap':
            return (x.mean(dim=1), )
        return (self.attn_pool(x), )
