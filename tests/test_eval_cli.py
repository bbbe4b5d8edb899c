"""qtrain-eval evaluates a checkpoint exactly as the run logged its test/acc."""

import pytest

from qtrain.run.runner import train_run
from qtrain.tools.eval import evaluate_checkpoint


@pytest.mark.parametrize("channels_last", [True, False])
def test_eval_equals_the_runs_own_test_numbers_in_its_memory_format(make_cfg, fake_cifar_root, tmp_path,
                                                                   channels_last):
    # ResNet-20's batch norm rounds differently in channels-last and contiguous layouts on the CPU, so an
    # evaluation in another layout than the run's gives other last bits (and can flip an activation level)
    cfg = make_cfg("model=resnet20", "data=cifar10", f"data.root={fake_cifar_root}", "abits=4", "epochs=1",
                   "data.batch_size=16", f"channels_last={channels_last}")
    result = train_run(cfg, tmp_path / "run")
    got = evaluate_checkpoint(tmp_path / "run", data_root=fake_cifar_root)
    assert got["test_acc"] == result["final_test_acc"] and got["test_loss"] == result["final_test_loss"]
