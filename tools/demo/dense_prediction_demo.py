"""The dense-prediction demo: dense vs recycled MoE backbones, on a CPU.

1. Writes scikit-learn's digits as an image folder (``data/digits``) and,
   from them, the canvas sets (``data/digit_canvas``): digits pasted on
   96 px canvases, COCO boxes and masks, PNG label maps.
2. Pretrains a small dense ViT classifier on the digits (patch 8).
3. Trains, from that one checkpoint (``RecycleDenseInit``), Mask R-CNN and
   UperNet with the ViT + simple feature pyramid, dense and with MoE
   blocks 1 and 3 upcycled (4 experts, top-2, ``MoEAuxLossHook``), the
   same number of epochs each, through MMDetection's and MMSegmentation's
   runners (``tools/dist_train.sh CONFIG --gpus``; gloo on CPUs).
4. Writes ``OUT/summary.json``::

       {"detection": {"dense": {"bbox_mAP": x, ...}, "moe": {...}},
        "segmentation": {"dense": {"mIoU": x, ...}, "moe": {...}},
        "pretrain": {...}, "seconds": {...}, "settings": {...}}

Usage::

    python tools/demo/dense_prediction_demo.py --out work_dirs/dense_demo
"""
import argparse
import glob
import json
import os
import os.path as osp
import sys
import time

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from recycling_demo import train  # noqa: E402

CONFIGS = osp.join('configs', 'demo', 'dense')
PRETRAIN = osp.join(CONFIGS, 'vit-p8_2xb64_digits.py')
RUNS = {
    ('detection', 'dense'): 'mask-rcnn_vit-pyramid_2xb4_digit-canvas.py',
    ('detection', 'moe'): 'mask-rcnn_vmoe-pyramid_2xb4_digit-canvas.py',
    ('segmentation', 'dense'): 'upernet_vit-pyramid_2xb4_digit-canvas.py',
    ('segmentation', 'moe'): 'upernet_vmoe-pyramid_2xb4_digit-canvas.py',
}
#: The figures kept from each run's last validation.
METRICS = {
    'detection': {'coco/bbox_mAP': 'bbox_mAP', 'coco/bbox_mAP_50':
                  'bbox_mAP_50', 'coco/segm_mAP': 'segm_mAP'},
    'segmentation': {'mIoU': 'mIoU', 'mAcc': 'mAcc', 'aAcc': 'aAcc'},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='work_dirs/dense_demo',
                        help='work directory; summary.json goes here')
    parser.add_argument('--gpus', type=int, default=2,
                        help='processes per run (CPU: gloo)')
    parser.add_argument('--data-root', default='data')
    parser.add_argument('--det-epochs', type=int, default=5,
                        help='epochs of each detection run')
    parser.add_argument('--seg-epochs', type=int, default=12,
                        help='epochs of each segmentation run')
    parser.add_argument('--tasks', nargs='+', default=list(METRICS),
                        choices=list(METRICS),
                        help='tasks to (re)run; the others keep their '
                        'figures of an earlier summary.json in --out')
    parser.add_argument('--pretrain-epochs', type=int, default=15)
    parser.add_argument('--num-train', type=int, default=300,
                        help='training canvases')
    parser.add_argument('--num-val', type=int, default=100,
                        help='validation canvases')
    return parser.parse_args(argv)


def last_scalars(work_dir):
    """The last validation row of the run's scalars.json."""
    paths = sorted(
        glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not paths:
        raise SystemExit(f'no scalars.json under {work_dir}')
    rows = [json.loads(line) for line in open(paths[-1]) if line.strip()]
    rows = [r for r in rows if 'loss' not in r and 'lr' not in r]
    if not rows:
        raise SystemExit(f'no validation in {paths[-1]}')
    return rows[-1]


def main(argv=None):
    args = parse_args(argv)
    os.chdir(REPO_ROOT)
    from moe_plugin.datasets import prepare_digit_canvas, prepare_digits
    from moe_plugin.fileio import atomic_outputs

    start = time.perf_counter()
    seconds = {}
    digits = prepare_digits(osp.join(args.data_root, 'digits'))
    canvas = prepare_digit_canvas(
        osp.join(args.data_root, 'digit_canvas'), args.num_train,
        args.num_val)
    seconds['data'] = round(time.perf_counter() - start, 1)

    pretrain_dir = osp.join(args.out, 'pretrain')
    dense = osp.join(pretrain_dir, f'epoch_{args.pretrain_epochs}.pth')
    out = osp.join(args.out, 'summary.json')
    previous = {}
    if osp.isfile(out):
        with open(out) as f:
            previous = json.load(f)
    if not osp.isfile(dense):
        seconds['pretrain'] = round(train(
            PRETRAIN, pretrain_dir, args.gpus,
            f'train_dataloader.dataset.data_root={digits}',
            f'val_dataloader.dataset.data_root={digits}',
            f'train_cfg.max_epochs={args.pretrain_epochs}',
            f'train_cfg.val_interval={args.pretrain_epochs}',
            f'default_hooks.checkpoint.interval={args.pretrain_epochs}'), 1)
    pretrain_top1 = last_scalars(pretrain_dir).get('accuracy/top1')

    root = canvas['root'].rstrip('/') + '/'
    summary = {task: previous.get(task, {}) for task in METRICS}
    seconds = dict(previous.get('seconds', {}), **seconds)
    epochs = dict(detection=args.det_epochs, segmentation=args.seg_epochs)
    for (task, kind), config in RUNS.items():
        if task not in args.tasks:
            continue
        work_dir = osp.join(args.out, f'{task}_{kind}')
        options = [
            f'model.backbone.init_cfg.checkpoint={dense}',
            f'train_cfg.max_epochs={epochs[task]}',
            f'train_cfg.val_interval={epochs[task]}',
            f'default_hooks.checkpoint.interval={epochs[task]}',
        ] + [f'{loader}.dataset.data_root={root}' for loader in (
            'train_dataloader', 'val_dataloader', 'test_dataloader')]
        if task == 'detection':
            options.append(
                f'val_evaluator.ann_file={canvas["val"]}')
        print(f'{task} / {kind}: {config}', flush=True)
        seconds[f'{task}_{kind}'] = round(
            train(osp.join(CONFIGS, config), work_dir, args.gpus, *options),
            1)
        row = last_scalars(work_dir)
        summary[task][kind] = {
            name: round(row[key], 4)
            for key, name in METRICS[task].items() if key in row
        }
        print(f'  {summary[task][kind]}', flush=True)
    seconds['total'] = round(time.perf_counter() - start, 1)
    summary.update(
        pretrain=dict(checkpoint=dense, val_top1=pretrain_top1),
        seconds=seconds,
        settings=dict(gpus=args.gpus, epochs=epochs,
                      pretrain_epochs=args.pretrain_epochs,
                      num_train=args.num_train, num_val=args.num_val,
                      configs={f'{t}_{k}': osp.join(CONFIGS, c)
                               for (t, k), c in RUNS.items()}))
    with atomic_outputs([out]) as (tmp, ):
        with open(tmp, 'w') as f:
            json.dump(summary, f, indent=1)
    print(json.dumps({t: summary[t] for t in METRICS}, indent=1))
    print(f'summary: {out}')


if __name__ == '__main__':
    main()
