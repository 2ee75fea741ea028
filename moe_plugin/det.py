"""Import for MMDetection configs:
``custom_imports=dict(imports=['moe_plugin.det'])``.

Registers moe_plugin's backbones, necks and layers into MMDetection's
``MODELS`` and raises ``ImportError`` naming the ``det`` extra and the mmcv
step when MMDetection or mmcv's compiled ops are missing
(``imports=['moe_plugin']`` registers too, silently skipping a missing
MMDetection).
"""
import moe_plugin  # noqa: F401
from moe_plugin.models.dense import require

require('mmdet')
