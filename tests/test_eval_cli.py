"""qtrain-eval evaluates a checkpoint exactly as the run logged its test/acc."""

import pytest
import torch

from qtrain.models.common import UnitAffineBatchNorm2d
from qtrain.run.runner import train_run
from qtrain.tools.eval import evaluate_checkpoint, main, reestimate_batch_norm


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


@pytest.mark.parametrize("norm", [torch.nn.BatchNorm2d, UnitAffineBatchNorm2d])  # (the non-affine ResNets' one)
def test_reestimated_batch_norms_are_plain_averages_over_the_batches_and_the_momentum_is_kept(norm):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), norm(4))
    batches = [(torch.randn(8, 3, 6, 6) * (i + 1) + i, None) for i in range(3)]
    assert reestimate_batch_norm(model, iter(batches)) == 3
    bn = model[1]
    with torch.no_grad():
        outs = [model[0](x) for x, _ in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)  # what batch norm keeps
    assert torch.allclose(bn.running_mean, mean, atol=1e-6) and torch.allclose(bn.running_var, var, rtol=1e-5)
    assert bn.momentum == 0.1 and not model.training


def test_bn_reestimate_reports_both_numbers_and_leaves_the_checkpoint_as_it_was(make_cfg, fake_cifar_root, tmp_path):
    cfg = make_cfg("model=resnet20", "data=cifar10", f"data.root={fake_cifar_root}", "abits=2", "wbits=1",
                   "method=binaryrelax", "epochs=1", "data.batch_size=16")
    result = train_run(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()
    got = evaluate_checkpoint(tmp_path / "run", data_root=fake_cifar_root, bn_reestimate=2)
    assert got["test_acc"] == result["final_test_acc"] and got["test_loss"] == result["final_test_loss"]
    assert got["bn_reestimated_batches"] == 2
    assert got["test_loss_bn_reestimated"] != got["test_loss"]  # other statistics, another loss
    assert ckpt.read_bytes() == before
    # more batches than the training split has: all of them (64 images / 16 = 4), and it says so
    assert evaluate_checkpoint(tmp_path / "run", data_root=fake_cifar_root, bn_reestimate=50)[
        "bn_reestimated_batches"] == 4


def test_bn_reestimate_needs_at_least_one_batch(make_cfg, fake_cifar_root, tmp_path, capsys):
    cfg = make_cfg("model=resnet20", "data=cifar10", f"data.root={fake_cifar_root}", "abits=4", "epochs=1",
                   "data.batch_size=16")
    train_run(cfg, tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "run"), "--data-root", fake_cifar_root, "--bn-reestimate", "0"])
    assert e.value.code != 0
    # (the last line: an earlier test's log handler may have left "Logging error" noise on stderr before it)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("qtrain-eval: error:") and "--bn-reestimate 0" in last
