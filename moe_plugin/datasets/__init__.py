"""Data sets of the demo, the recycling benchmark and the dense-prediction
demo (no downloads)."""
from .digit_canvas import CANVAS_CLASSES, SEG_CLASSES, prepare_digit_canvas
from .digits import DIGITS_CLASSES, prepare_digits
from .fashion_mnist import (FASHION_MNIST_CLASSES, FashionMNISTSubset,
                            check_class_split, prepare_fashion_mnist, read_idx)

__all__ = [
    'DIGITS_CLASSES', 'prepare_digits', 'FASHION_MNIST_CLASSES',
    'FashionMNISTSubset', 'check_class_split', 'prepare_fashion_mnist',
    'read_idx', 'CANVAS_CLASSES', 'SEG_CLASSES', 'prepare_digit_canvas'
]
