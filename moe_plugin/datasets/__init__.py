"""Small data sets that the project writes itself (no downloads)."""
from .digit_canvas import CANVAS_CLASSES, SEG_CLASSES, prepare_digit_canvas
from .digits import DIGITS_CLASSES, prepare_digits

__all__ = [
    'DIGITS_CLASSES', 'prepare_digits', 'CANVAS_CLASSES', 'SEG_CLASSES',
    'prepare_digit_canvas'
]
