"""moe_plugin.analysis.recycling_report: format, table numbers, plots."""
import math

import pytest

from moe_plugin.analysis import recycling_report as report


def summary(**changes):
    """3 seeds, 4 epochs; numbers chosen to be computed by hand below."""
    out = dict(
        dataset='fashion_mnist',
        upstream_classes=[0, 1, 2, 3, 4],
        downstream_classes=[5, 6, 7, 8, 9],
        epochs=4,
        train_images_per_class=100,
        seeds=[0, 1, 2],
        dense_upstream=[80.0, 82.0, 84.0],
        runs=dict(
            scratch=[[10, 20, 30, 40], [12, 22, 32, 42], [14, 24, 34, 44]],
            upcycle=[[30, 41, 50, 60], [32, 43, 52, 63], [34, 45, 54, 57]],
            dense_finetune=[[30, 40, 50, 58], [30, 40, 50, 60],
                            [30, 40, 50, 56]]))
    out.update(changes)
    return out


def test_table_numbers_by_hand():
    rows = {r['run']: r for r in report.table_rows(summary())}
    # scratch's final mean: (40 + 42 + 44) / 3 = 42.
    assert rows['scratch']['final_mean'] == pytest.approx(42.0)
    assert rows['scratch']['final_std'] == pytest.approx(2.0)
    assert rows['scratch']['reach'] == 4
    # upcycle's mean curve: 32, 43, 52, 60: reaches 42 at epoch 2.
    assert rows['upcycle']['reach'] == 2
    assert rows['upcycle']['final_mean'] == pytest.approx(60.0)
    assert rows['upcycle']['final_std'] == pytest.approx(3.0)
    # Paired differences to dense_finetune: 2, 3, 1 -> mean 2, sample std
    # 1, standard error 1 / sqrt(3).
    assert rows['upcycle']['vs_dense'] == pytest.approx(2.0)
    assert rows['upcycle']['vs_dense_se'] == pytest.approx(1 / math.sqrt(3))
    assert rows['dense_finetune']['vs_dense'] == 0
    text = report.format_table(summary())
    assert 'upcycle' in text and '60.0 ± 3.0' in text and '2/4' in text
    assert '+2.0 ± 0.6' in text and 'dense ViT 82.0 ± 2.0' in text


def test_one_seed_and_never():
    one = summary(seeds=[0], dense_upstream=[80.0], runs=dict(
        scratch=[[10, 20, 30, 40]], upcycle=[[5, 6, 7, 8]]))
    rows = {r['run']: r for r in report.table_rows(one)}
    assert rows['upcycle']['reach'] is None
    assert rows['upcycle']['final_std'] == 0
    assert rows['upcycle']['vs_dense'] is None  # no dense_finetune run
    assert 'never' in report.format_table(one)


@pytest.mark.parametrize('change, match', [
    (dict(epochs=5), r'runs.scratch has shape \(3, 4\)'),
    (dict(dense_upstream=[1.0]), 'dense_upstream has 1 values'),
    (dict(runs=dict(upcycle=[[1, 2, 3, 4]] * 3)), "lack 'scratch'"),
])
def test_bad_summary(change, match):
    with pytest.raises(ValueError, match=match):
        report.table_rows(summary(**change))
    bad = summary()
    del bad['seeds']
    with pytest.raises(ValueError, match='seeds'):
        report.check_summary(bad)


def test_sweep_table_and_plots(tmp_path):
    small = summary(train_images_per_class=20)
    sweep = dict(train_images_per_class=[20, 100],
                 summaries=[small, summary()])
    rows = report.sweep_rows(sweep)
    assert [(r['size'], r['run']) for r in rows[:3]] == [
        (20, 'scratch'), (20, 'upcycle'), (20, 'dense_finetune')]
    text = report.format_sweep_table(sweep)
    assert '60.0 (2)' in text and '42.0 (4)' in text
    curves = report.plot_curves(summary(), str(tmp_path / 'curves.png'))
    size = report.plot_size_sweep(sweep, str(tmp_path / 'size_sweep.png'))
    for path in (curves, size):
        with open(path, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'curves.png', 'size_sweep.png']
