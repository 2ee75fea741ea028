"""Registered MMEngine hooks and optimizer constructors of moe_plugin."""
from .hooks import RandomStateHook

__all__ = ['RandomStateHook']
