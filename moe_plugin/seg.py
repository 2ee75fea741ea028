"""Import for MMSegmentation configs:
``custom_imports=dict(imports=['moe_plugin.seg'])``.

Registers moe_plugin's backbones, necks and layers into MMSegmentation's
``MODELS`` and raises ``ImportError`` naming the ``seg`` extra and the mmcv
step when MMSegmentation or mmcv's compiled ops are missing
(``imports=['moe_plugin']`` registers too, silently skipping a missing
MMSegmentation).
"""
import moe_plugin  # noqa: F401
from moe_plugin.models.dense import require

require('mmseg')
