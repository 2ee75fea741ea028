"""Write scikit-learn's digits as an image folder for the demo config.

Example:
    python tools/prepare_digits.py            # -> data/digits/{train,val}
"""
import argparse
import os.path as osp
import sys

# Run from a clone without installation: the repository root first.
REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from moe_plugin.cli import HelpFormatter, add_debug_arg, run_main  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Write the scikit-learn digits image folder',
        formatter_class=HelpFormatter)
    parser.add_argument(
        '--root', default='data/digits', help='output folder')
    parser.add_argument(
        '--img-size', type=int, default=32, help='image side in pixels')
    parser.add_argument(
        '--val-ratio', type=float, default=0.2, help='share held out')
    parser.add_argument('--seed', type=int, default=0, help='split seed')
    add_debug_arg(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from moe_plugin.datasets import prepare_digits
    from moe_plugin.datasets.digits import NUM_IMAGES

    root = prepare_digits(
        args.root,
        img_size=args.img_size,
        val_ratio=args.val_ratio,
        seed=args.seed)
    print(f'{NUM_IMAGES} digits images in {osp.abspath(root)}/{{train,val}}')


if __name__ == '__main__':
    run_main(main)
