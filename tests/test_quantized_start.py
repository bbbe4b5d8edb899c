"""scripts/quantized_start.py: a cell's accuracy before quantization-aware training, from its own float model."""

import json

import pytest

from qtrain.errors import QtrainError
from qtrain.run import float_cache
from qtrain.run.runner import train_run


@pytest.fixture
def quantized_start(load_script):
    return load_script("quantized_start").quantized_start


def test_finds_the_cells_float_model_and_evaluates_it_as_a_run_does(quantized_start, make_cfg, fake_cifar_root,
                                                                    tmp_path):
    cell = ["experiment=ste/cifar10_resnet20_a2_clipped_relu", "schedule_scale=0.01", f"data.root={fake_cifar_root}",
            f"out_dir={tmp_path / 'outputs'}"]
    with pytest.raises(QtrainError, match="no finished float model"):  # never trains one itself
        quantized_start(cell)
    ckpt = float_cache.float_checkpoint(make_cfg(*cell), train_run)  # what the cell's init=float trains
    float_acc = json.loads((ckpt.parent.parent / "result.json").read_text())["final_test_acc"]
    out = quantized_start(cell)
    assert out["float_model"] == str(ckpt) and out["float_test_acc"] == float_acc and out["abits"] == 2
    assert 0 <= out["quantized_start_test_acc"] <= 100
    # with the quantizers taken out, the start is the float model itself: the same evaluation as its run's
    same = quantized_start(cell + ["abits=null"])
    assert same["float_model"] == str(ckpt) and same["quantized_start_test_acc"] == float_acc
