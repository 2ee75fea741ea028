"""Small data sets that the project writes itself (no downloads)."""
from .digits import DIGITS_CLASSES, prepare_digits

__all__ = ['DIGITS_CLASSES', 'prepare_digits']
