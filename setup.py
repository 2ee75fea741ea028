"""Install moe_plugin: ``pip install -e .[dev]`` (add ``lite`` for mmcv-lite).

MMCV is not a hard requirement: MMPretrain needs either the full ``mmcv``
(built for your CUDA) or ``mmcv-lite``. Install one yourself, or the
``lite`` extra, so that a full mmcv is never replaced. Detection (``det``)
and segmentation (``seg``) need the full mmcv < 2.2 (compiled ops):
``tools/install_mmcv.sh`` (CPU) or ``mim install 'mmcv<2.2'`` (CUDA) first.
"""
import os.path as osp

from setuptools import find_packages, setup


def read_version():
    scope = {}
    with open(osp.join(osp.dirname(__file__), 'moe_plugin', '__init__.py')) \
            as f:
        for line in f:
            if line.startswith('__version__'):
                exec(line, scope)
    return scope['__version__']


setup(
    name='moe_plugin',
    version=read_version(),
    description='Mixture-of-Experts Vision Transformers (V-MoE and '
    'relatives) for MMPretrain',
    long_description=open('README.md', encoding='utf-8').read()
    if osp.isfile('README.md') else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(
        exclude=('tests', 'tests.*', 'configs', 'configs.*', 'tools',
                 'tools.*', 'benchmarks', 'benchmarks.*')),
    python_requires='>=3.9',
    install_requires=[
        'torch',
        'mmengine>=0.10,<0.11',
        'mmpretrain>=1.2,<1.3',
        'timm>=1.0',
        'einops',
        'safetensors',
    ],
    extras_require={
        # mmdet 3.3 and mmseg 1.2 assert mmcv < 2.2 at import.
        'lite': ['mmcv-lite>=2.0.0rc4,<2.2'],
        # MMDetection / MMSegmentation backbones (moe_plugin.models.dense);
        # mmseg imports ftfy and regex without declaring them.
        'det': ['mmdet>=3.3,<3.4'],
        'seg': ['mmsegmentation>=1.2,<1.3', 'ftfy', 'regex'],
        # tools/model_converters/vmoe_to_mmpretrain.py (V-MoE checkpoints)
        'convert': ['msgpack>=1.0'],
        'graph': ['networkx', 'scikit-learn', 'pymetis'],
        'tensorboard': ['tensorboard'],
        # entmax: the tests compare moe_plugin.layers.entmax with it
        'dev': ['pytest', 'flake8', 'isort', 'yapf', 'scikit-learn',
                'entmax>=1.1', 'networkx', 'msgpack>=1.0'],
    },
    zip_safe=False,
)
