from .moe_neck import POOL_TYPES, MoENeck, MoENeckBlock

__all__ = ['POOL_TYPES', 'MoENeck', 'MoENeckBlock']
