import json

import torch
from PIL import Image

from utils.tracking import MetricsLog, Tracker, grid_images, plot_curves, save_image_grid


def test_metrics_log_appends_json_lines(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.log({"it": 0, "loss": torch.tensor(0.5)})
    log.log({"it": 1, "loss": 0.25})
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"it": 0, "loss": 0.5}, {"it": 1, "loss": 0.25}]


def test_grid_normalises_each_image_and_upsamples():
    images = torch.stack([torch.full((3, 2, 2), 5.0), torch.arange(12.0).reshape(3, 2, 2)])
    grid = grid_images(images, upsample=4)
    assert grid.shape == (2, 3, 8, 8)
    assert grid[1].min() == 0 and grid[1].max() == 1
    assert torch.all(grid[1, :, :4, :4] == grid[1, :, 0:1, 0:1])  # nearest upsampling


def test_clipping_limits_outliers():
    x = torch.zeros(1, 1, 10, 10)
    x[0, 0, 0, 0] = 1000.0
    clipped = grid_images(x, upsample=1, clip_std=2.5)
    unclipped = grid_images(x, upsample=1)
    # without clipping the one outlier takes the whole range; with clipping the rest is not 0-only
    assert unclipped[0, 0, 0, 0] == 1 and unclipped.sum() == 1
    mean, std = x.mean(), x.std()
    assert torch.allclose(clipped, (x.clamp(max=mean + 2.5 * std) - 0) / (mean + 2.5 * std))


def test_png_outputs(tmp_path):
    save_image_grid(torch.rand(12, 3, 4, 4), tmp_path / "g.png", nrow=10, upsample=4)
    width, height = Image.open(tmp_path / "g.png").size
    assert (width, height) == (10 * 16 + 11 * 2, 2 * 16 + 3 * 2)
    plot_curves(tmp_path / "loss.png", [0, 1, 2], {"loss": [1.0, 0.8, 0.7], "start": [0, 2, 1]})
    assert Image.open(tmp_path / "loss.png").format == "PNG"


def test_tracker_without_wandb_writes_metrics(tmp_path):
    tracker = Tracker(tmp_path, wandb_mode="off")
    tracker.log(3, {"acc": 0.5})
    tracker.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "acc": 0.5}
