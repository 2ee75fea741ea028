from .vision_moe import (ACT_CFGS, MoETransformerEncoderLayer, VisionMoE,
                         parse_moe_layers)

__all__ = [
    'ACT_CFGS', 'MoETransformerEncoderLayer', 'VisionMoE', 'parse_moe_layers'
]
