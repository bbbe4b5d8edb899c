"""Every option of every config group composes and instantiates; every experiment file composes."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qtrain.run.build import build, build_act_layer
from qtrain.run.float_start import effective_pretrain, float_config
from qtrain.run.resume import fingerprint, identity

from .conftest import CONFIG_DIR


def options(group):
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def experiments():
    base = Path(CONFIG_DIR) / "experiment"
    return sorted(str(p.relative_to(base).with_suffix("")) for p in base.glob("**/*.yaml"))


def test_every_group_has_options():
    for group in ("data", "model", "ste", "method", "optim", "sched"):
        assert options(group), group
    assert len([e for e in experiments() if e.startswith("ste/")]) == 20  # Table 1 cells, §4.2 and its control


@pytest.mark.parametrize("ste", options("ste"))
@pytest.mark.parametrize("model", [m for m in options("model") if m != "twolayer"])
def test_models_with_every_ste_build_and_run(make_cfg, model, ste):
    cfg = make_cfg(f"model={model}", f"ste={ste}", "abits=2")
    shape = (1, 28, 28) if model == "lenet5" else (3, 32, 32)
    net = instantiate(cfg.model, _partial_=True, num_classes=10, input_shape=shape)(act_layer=build_act_layer(cfg))
    x = torch.randn(4, *shape, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("method", options("method"))
@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("sched", options("sched"))
def test_methods_optimizers_schedulers_build(make_cfg, mnist_root, method, optim, sched):
    wbits = "null" if method == "float" else "1"
    cfg = make_cfg(f"method={method}", f"optim={optim}", f"sched={sched}", f"wbits={wbits}",
                   f"data.root={mnist_root}", "data.limit_train=64", "data.limit_test=64")
    built = build(cfg, torch.device("cpu"))
    assert built.method.name == method and isinstance(built.optimizer, torch.optim.Optimizer)
    assert bool(built.quantized) == (method != "float")


@pytest.mark.parametrize("data", options("data"))
def test_every_dataset_builds(make_cfg, mnist_root, fake_cifar_root, fake_imagenet_root, data):
    root = {"mnist": mnist_root, "idx": mnist_root, "imagenet": fake_imagenet_root}.get(data, fake_cifar_root)
    model = {"teacher": "twolayer", "imagenet": "resnet18", "mnist": "lenet5", "idx": "lenet5"}.get(data, "resnet20")
    extra = {"imagenet": ["data.image_size=32", "data.workers=0"],
             "npz": ["data.file=cifar10.npz", "data.num_classes=10"]}.get(data, [])
    cfg = make_cfg(f"data={data}", f"model={model}", f"data.root={root}", "data.limit_train=8", "data.limit_test=8",
                   *extra)
    built = build(cfg, torch.device("cpu"))
    bundle, net = built.data, built.model
    x, y = next(iter(bundle.train))
    assert tuple(x.shape[1:]) == tuple(bundle.input_shape) and len(y) == len(x)
    out = net(x)
    assert out.shape[0] == len(x)


@pytest.mark.parametrize("name", experiments())
def test_every_experiment_composes(make_cfg, name):
    from_a4 = "instability" in name  # §4.2 and its control start from a trained a4 model the user names
    if from_a4:
        assert make_cfg(f"experiment={name}").init.startswith("<give init=")
    cfg = make_cfg(f"experiment={name}", *(["init=a4.pt"] if from_a4 else []))
    OmegaConf.resolve(cfg)
    assert cfg.paper is None or "source" in cfg.paper
    assert cfg.init in ("float", "a4.pt") and cfg.epochs >= 1
    # the float model it starts from has float weights/activations and its own fingerprint
    fcfg = float_config(cfg)
    assert fcfg.abits is None and fcfg.wbits is None and fcfg.method._target_.endswith("Float")
    assert fingerprint(fcfg) != fingerprint(cfg)


def test_float_model_shared_across_stes(make_cfg):
    """All cells of one table row start from the same cached float model."""
    a = float_config(make_cfg("experiment=ste/mnist_lenet5_a2_identity"))
    b = float_config(make_cfg("experiment=ste/mnist_lenet5_a4_clipped_relu"))
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize("name", [e for e in experiments() if "instability" not in e])
def test_an_lr_override_changes_the_run_not_its_float_start(make_cfg, name):
    """`qtrain experiment=X optim.lr=...` tries another rate for the quantized training; the float model it
    starts from (trained once, cached, shared with the configured cell) must stay the same one."""
    plain = make_cfg(f"experiment={name}")
    other = make_cfg(f"experiment={name}", f"optim.lr={plain.optim.lr / 7}")
    assert OmegaConf.to_container(float_config(other)) == OmegaConf.to_container(float_config(plain))
    assert other.optim.lr != plain.optim.lr


def test_a_pretrain_entry_that_pins_the_runs_own_value_is_not_part_of_its_identity(make_cfg, mnist_root):
    """So an experiment can pin its float recipe without orphaning the runs made before (resume=true)."""
    cell = ("experiment=ste/mnist_lenet5_a4_relu", f"data.root={mnist_root}")  # trains at lr 0.1, pins 0.1
    pinned, unpinned = make_cfg(*cell), make_cfg(*cell, "~pretrain.optim")
    assert pinned.pretrain.optim.lr == pinned.optim.lr and effective_pretrain(pinned) == {}
    assert identity(pinned) == identity(unpinned)
    other = make_cfg(*cell, "pretrain.optim.lr=0.05")  # a different float start: a different run
    assert effective_pretrain(other) == {"optim": {"lr": 0.05}} and identity(other) != identity(pinned)


def test_a_pretrain_entry_equal_to_a_key_the_float_model_resets_is_kept(make_cfg):
    """abits=4 in pretrain is not a no-op even on a 4-bit run: the float model's abits is otherwise None."""
    cfg = make_cfg("experiment=ste/cifar10_resnet20_a4_relu", "+pretrain.abits=4")
    assert cfg.abits == 4 and effective_pretrain(cfg) == {"optim": {"lr": 0.1}, "abits": 4}
