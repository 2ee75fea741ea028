from .convnext_moe import ConvNeXtMoE, ConvNeXtMoEBlock, parse_moe_blocks
from .vision_moe import MoETransformerEncoderLayer, VisionMoE, parse_moe_layers

__all__ = [
    'ConvNeXtMoE', 'ConvNeXtMoEBlock', 'parse_moe_blocks',
    'MoETransformerEncoderLayer', 'VisionMoE', 'parse_moe_layers'
]
