"""Smoke-run one experiment file of each paper / model family on small stand-in data,
float pretraining (init=float) included, and check its result carries the paper's numbers."""

import pytest

from qtrain.run.runner import main_run

FAMILIES = [
    "ste/mnist_lenet5_a2_identity",
    "ste/cifar10_vgg11_a4_relu",
    "ste/cifar10_resnet20_a2_clipped_relu",
    "br/cifar10_vgg11_w1",
    "br/cifar10_resnet20_w2",
    "bcgd/cifar10_vgg11_w1a4",
    "bcgd/cifar10_resnet20_w1a4",
    "bcgd/imagenet_resnet18_w1a4_first_last_float",
]
TINY = ["epochs=1", "++pretrain.epochs=1", "data.limit_train=16", "data.limit_test=8", "data.batch_size=8"]


@pytest.mark.parametrize("name", FAMILIES)
def test_experiment_smoke(make_cfg, tmp_path, mnist_root, fake_cifar_root, fake_imagenet_root, name):
    root = mnist_root if "mnist" in name else fake_imagenet_root if "imagenet" in name else fake_cifar_root
    extra = ["data.image_size=32", "data.workers=0"] if "imagenet" in name else []
    cfg = make_cfg(f"experiment={name}", *TINY, f"data.root={root}", *extra)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = main_run(cfg, run_dir, {"experiment": name})
    assert result["status"] == "complete" and result["init"].endswith("last.pt")
    assert result["paper"] == dict(cfg.paper) and result["choices"]["experiment"] == name
    summary = result["model_summary"]
    if cfg.wbits == 1:  # every quantized layer really holds two values when evaluated
        assert summary["distinct_weight_values"] and set(summary["distinct_weight_values"].values()) == {2}
        assert summary["compression"] > 1
