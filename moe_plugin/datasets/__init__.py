"""Data sets of the demo and the recycling benchmark (no downloads)."""
from .digits import DIGITS_CLASSES, prepare_digits
from .fashion_mnist import (FASHION_MNIST_CLASSES, FashionMNISTSubset,
                            check_class_split, prepare_fashion_mnist, read_idx)

__all__ = [
    'DIGITS_CLASSES', 'prepare_digits', 'FASHION_MNIST_CLASSES',
    'FashionMNISTSubset', 'check_class_split', 'prepare_fashion_mnist',
    'read_idx'
]
