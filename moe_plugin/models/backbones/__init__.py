from .convnext_moe import ConvNeXtMoE, ConvNeXtMoEBlock, parse_moe_blocks
from .vision_moe import (ACT_CFGS, MoETransformerEncoderLayer, VisionMoE,
                         parse_moe_layers)

__all__ = [
    'ConvNeXtMoE', 'ConvNeXtMoEBlock', 'parse_moe_blocks',
    'ACT_CFGS', 'MoETransformerEncoderLayer', 'VisionMoE', 'parse_moe_layers'
]
