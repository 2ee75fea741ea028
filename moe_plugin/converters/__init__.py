"""Peer checkpoints into ours: pure functions, one module per source format.

- :mod:`.vmoe`: google-research/vmoe's released checkpoints (sparse V-MoE
  and Soft MoE ViTs), whose ``PREFIX.index`` + ``PREFIX.data-nnnnn-of-NNNNN``
  files :mod:`.vmoe_checkpoint` reads with msgpack and numpy only;
- :mod:`.moejet`: MoE Jetpack's timm-style SpheroMoE ViT state dicts.

Each gives an :class:`~moe_plugin.models.MoEImageClassifier` state dict and
the ``model`` config that builds the matching model;
``tools/model_converters/*_to_mmpretrain.py`` are the CLIs.
"""
