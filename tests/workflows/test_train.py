"""workflows/train.py: the line run_training prints before training."""

import pytest

from workflows.train import run_training


class Stop(Exception):
    pass


@pytest.mark.parametrize("model, name", [({"depth": 18, "base_width": 8}, "GFL R-18 x0.125 width (5 classes)"),
                                         ({"backbone": "shufflenet_v2_x0_5"}, "GFL shufflenet_v2_x0_5 (5 classes)")])
def test_the_training_line_names_the_backbone(tiny_coco, tmp_path, model, name):
    lines = []

    def echo(line):  # the line comes before any training: stop there
        lines.append(line)
        raise Stop

    data = {"images": str(tiny_coco["images"]), "ann": str(tiny_coco["ann"]), "img_scale": (96, 96)}
    with pytest.raises(Stop):
        run_training({"data": data, "model": model, "train": {}, "loss": {}}, tmp_path / "run", resume=False, echo=echo)
    assert lines[0].startswith(f"training {name} on "), lines
