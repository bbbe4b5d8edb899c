"""Every malformed input is one paragraph naming the key or file and exit 2 (Hydra's own message and
exit 1 for unknown keys and group options), never a traceback, and nothing is written into a data root.

The command runs in-process (qtrain.cli.main with sys.argv set), so the ~60 cases cost seconds.
"""

import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qtrain import cli

RUN = ["epochs=1", "data.limit_train=64", "data.limit_test=32", "progress=false"]


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def mnist_root_with(root: Path, damage) -> str:
    """A copy of a tiny valid MNIST (idx files), then ``damage(raw_folder)``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(rng.integers(0, 10, n, dtype=np.uint8)))
    damage(raw)
    return str(root)


def cifar_root_with(root: Path, **arrays) -> str:
    rng = np.random.default_rng(0)
    base = dict(train_x=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), train_y=rng.integers(0, 10, 64),
                test_x=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), test_y=rng.integers(0, 10, 32))
    raw = arrays.pop("raw", None)
    base.update(arrays)
    root.mkdir(parents=True)
    if raw is not None:
        (root / "cifar10.npz").write_bytes(raw)
    else:
        np.savez(root / "cifar10.npz", **{k: v for k, v in base.items() if v is not None})
    return str(root)


def _truncate(raw):
    p = raw / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:1000])


def _labels_for_images(raw):
    (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-labels-idx1-ubyte").read_bytes())


def _empty(raw):
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"")


def _garbage(raw):
    (raw / "t10k-labels-idx1-ubyte").write_bytes(os.urandom(200))


def _bad_gzip(raw):
    p = raw / "train-labels-idx1-ubyte"
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(p.read_bytes())[:30])
    p.unlink()


def _label_too_large(raw):
    p = raw / "t10k-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-1] + bytes([12]))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Named data roots and files for the cases below (made once)."""
    base = tmp_path_factory.mktemp("bad_data")
    r = {}
    for name, damage in (("mnist_truncated", _truncate), ("mnist_labels_as_images", _labels_for_images),
                         ("mnist_empty", _empty), ("mnist_garbage", _garbage), ("mnist_bad_gzip", _bad_gzip),
                         ("mnist_label_12", _label_too_large), ("mnist_ok", lambda raw: None)):
        r[name] = mnist_root_with(base / name, damage)
    rng = np.random.default_rng(1)
    r["npz_label_10"] = cifar_root_with(base / "l10", train_y=np.full(64, 10))
    r["npz_negative"] = cifar_root_with(base / "neg", test_y=np.full(32, -1))
    r["npz_length"] = cifar_root_with(base / "len", train_y=np.zeros(63, dtype=np.int64))
    r["npz_empty_split"] = cifar_root_with(base / "zero", test_x=np.zeros((0, 32, 32, 3), np.uint8),
                                           test_y=np.zeros(0, np.int64))
    r["npz_float64"] = cifar_root_with(base / "f64", train_x=rng.random((64, 32, 32, 3)))
    r["npz_shape"] = cifar_root_with(base / "shape", train_x=np.zeros((64, 3, 32, 32), np.uint8))
    r["npz_missing_array"] = cifar_root_with(base / "miss", test_y=None)
    good = Path(cifar_root_with(base / "good")) / "cifar10.npz"
    r["npz_truncated"] = cifar_root_with(base / "trunc", raw=good.read_bytes()[:5000])
    r["npz_empty_file"] = cifar_root_with(base / "emptyf", raw=b"")
    r["npz_garbage"] = cifar_root_with(base / "garb", raw=os.urandom(4000))
    (base / "notes.txt").write_text("not a checkpoint")
    r["text_file"] = str(base / "notes.txt")
    r["a_folder"] = str(base / "good")
    from qtrain.models.lenet import LeNet5
    from qtrain.quant.act import ActLayer

    torch.save({"model": LeNet5(10, (1, 28, 28), ActLayer(), variant="caffe").state_dict()}, base / "caffe.pt")
    r["caffe_ckpt"] = str(base / "caffe.pt")
    (base / "empty_run").mkdir()
    r["empty_run"] = str(base / "empty_run")
    return r


# (case id, overrides ({name} = a path from `roots`), exit code, words the message must contain)
CASES = [
    ("abits-1000", ["abits=1000"], 2, "abits must be an integer from 1 to 16"),
    ("abits-0", ["abits=0"], 2, "abits must be an integer"),
    ("abits-text", ["abits=two"], 2, "abits must be an integer"),
    ("wbits-100", ["wbits=100", "method=ste"], 2, "wbits must be an integer from 1 to 8"),
    ("wbits-64-bcgd", ["wbits=64", "method=bcgd"], 2, "wbits must be an integer from 1 to 8"),
    ("wbits-33", ["wbits=33", "method=ste"], 2, "wbits must be an integer from 1 to 8"),
    ("seed-text", ["seed=abc"], 2, "seed must be an integer"),
    ("seed-huge", ["seed=2**70"], 2, "seed must be an integer"),
    ("seed-negative", ["seed=-1"], 2, "seed must be an integer"),
    ("epochs-negative", ["epochs=-3"], 2, "epochs must be a positive integer"),
    ("test-batch-0", ["data.test_batch_size=0"], 2, "data.test_batch_size must be a positive integer"),
    ("batch-0", ["data.batch_size=0"], 2, "data.batch_size must be a positive integer"),
    ("limit-negative", ["data.limit_train=-5"], 2, "data.limit_train must be a positive integer"),
    ("lr-negative", ["optim.lr=-0.1"], 2, "optim.lr must be a positive finite number"),
    ("lr-text", ["optim.lr=abc"], 2, "optim.lr must be a positive finite number"),
    ("lr-nan", ["optim.lr=nan"], 2, "optim.lr must be a positive finite number"),
    ("momentum-negative", ["optim.momentum=-1"], 2, "optim.momentum must be a number in [0.0, 1.0]"),
    ("momentum-text", ["optim.momentum=abc"], 2, "optim.momentum must be a number"),
    ("weight-decay-negative", ["optim.weight_decay=-1"], 2, "optim.weight_decay must be a number"),
    ("milestones-int", ["sched.milestones=5"], 2, "sched.milestones must be a list"),
    ("milestones-text", ["sched.milestones=abc"], 2, "sched.milestones must be a list"),
    ("milestones-unordered", ["sched.milestones=[20,10]"], 2, "sched.milestones must be a list of increasing"),
    ("gamma-0", ["sched.gamma=0"], 2, "sched.gamma must be a positive number"),
    ("proxy-missing", ["ste=proxy", "ste.fn=no.such.fn"], 2, "ste.fn=no.such.fn: no such function"),
    ("proxy-print", ["ste=proxy", "ste.fn=builtins.print"], 2, "ste.fn=builtins.print"),
    ("proxy-not-monotone", ["ste=proxy", "ste.fn=torch.abs"], 2, "not a monotone"),
    ("model-variant", ["model.variant=foo"], 2, "model.variant must be one of classic, caffe"),
    ("init-text-file", ["init={text_file}"], 2, "init="),
    ("init-folder", ["init={a_folder}"], 2, "a folder, not a file"),
    ("init-other-variant", ["init={caffe_ckpt}"], 2, "does not fit this model"),
    ("init-missing", ["init=/nonexistent/x.pt"], 2, "no such file"),
    ("init-not-given", ["experiment=ste/cifar10_resnet20_a4_instability", "data.root={a_folder}"], 2,
     "<give init=: the checkpoint of the a4"),
    ("mnist-labels-as-images", ["data.root={mnist_labels_as_images}"], 2, "is not an idx file of images"),
    ("mnist-truncated", ["data.root={mnist_truncated}"], 2, "truncated or malformed"),
    ("mnist-empty", ["data.root={mnist_empty}"], 2, "t10k-images-idx3-ubyte is not an idx file"),
    ("mnist-garbage", ["data.root={mnist_garbage}"], 2, "t10k-labels-idx1-ubyte"),
    ("mnist-bad-gzip", ["data.root={mnist_bad_gzip}"], 2, "train-labels-idx1-ubyte.gz cannot be read"),
    ("mnist-label-12", ["data.root={mnist_label_12}"], 2, "labels must be integers in [0, 9]"),
    ("npz-label-10", ["data=cifar10", "model=resnet20", "data.root={npz_label_10}"], 2, "labels must be integers in [0, 9]"),
    ("npz-negative", ["data=cifar10", "model=resnet20", "data.root={npz_negative}"], 2, "from -1"),
    ("npz-length", ["data=cifar10", "model=resnet20", "data.root={npz_length}"], 2, "one label per image"),
    ("npz-empty-split", ["data=cifar10", "model=resnet20", "data.root={npz_empty_split}"], 2, "no samples"),
    ("npz-float64", ["data=cifar10", "model=resnet20", "data.root={npz_float64}"], 2, "must be uint8"),
    ("npz-shape", ["data=cifar10", "model=resnet20", "data.root={npz_shape}"], 2, "must have shape [N, 32, 32, 3]"),
    ("npz-missing-array", ["data=cifar10", "model=resnet20", "data.root={npz_missing_array}"], 2, "lacks the array"),
    ("npz-truncated", ["data=cifar10", "model=resnet20", "data.root={npz_truncated}"], 2, "cannot be read as a .npz"),
    ("npz-empty-file", ["data=cifar10", "model=resnet20", "data.root={npz_empty_file}"], 2, "cannot be read as a .npz"),
    ("npz-garbage", ["data=cifar10", "model=resnet20", "data.root={npz_garbage}"], 2, "cannot be read as a .npz"),
    ("data-missing", ["data.root=/nonexistent/data"], 2, "MNIST was not found"),
    ("out-dir-file", ["out_dir={text_file}"], 2, "Cannot create the output folder"),
    ("out-dir-proc", ["out_dir=/proc/x"], 2, "Cannot create the output folder"),
    ("optim-adamw-momentum", ["optim._target_=torch.optim.AdamW"], 2, "optim: torch.optim.AdamW cannot be built"),
    ("augment-typo", ["data.augment=crop-flip"], 2, "data.augment must be one of null, crop_flip"),
    ("alpha-clamp-unordered", ["act.alpha_clamp=[5,0.001]"], 2, "act.alpha_clamp must be [low, high]"),
    ("learn-alpha-maybe", ["act.learn_alpha=maybe"], 2, "act.learn_alpha must be true or false"),
    ("alpha-negative", ["act.alpha=-1"], 2, "act.alpha must be positive"),
    ("rounding-floor", ["act.rounding=floor"], 2, "act.rounding must be one of"),
    ("stop-after-0", ["stop_after_epoch=0"], 2, "stop_after_epoch must be a positive integer"),
    ("devices-0", ["devices=0"], 2, "devices=0: at least one device is needed"),
    ("devices-word", ["devices=all"], 2, "devices=all: give a number of devices"),
    ("devices-fraction", ["devices=1.5"], 2, "devices=1.5: give a number of devices"),
    ("sync-bn-maybe", ["sync_bn=maybe"], 2, "sync_bn must be true or false"),
    ("collective-timeout-negative", ["collective_timeout_s=-1"], 2, "collective_timeout_s must be a positive"),
    ("stop-after-negative", ["stop_after_epoch=-3"], 2, "stop_after_epoch must be a positive integer"),
    ("schedule-scale-0", ["schedule_scale=0"], 2, "schedule_scale must be a number in (0, 10]"),
    ("schedule-scale-text", ["schedule_scale=abc"], 2, "schedule_scale must be a number"),
    ("device-tpu", ["device=tpu"], 2, "device must be auto, cpu, cuda"),
    ("quant-layers", ["quant_layers=some", "wbits=1", "method=ste"], 2, "quant_layers must be one of"),
    ("precision-fp8", ["precision=fp8"], 2, "precision must be fp32 or bf16"),
    ("wquant-fast", ["wquant=fast"], 2, "wquant must be one of exact, approx"),
    ("compile-maybe", ["compile=maybe"], 2, "compile must be true or false"),
    ("bcgd-rho", ["method=bcgd", "wbits=1", "method.rho=2"], 2, "bcgd needs 0 <= rho <= 1"),
    ("binaryrelax-growth", ["method=binaryrelax", "wbits=1", "method.growth=0.5", "method.phase2_epoch=0"], 2, "growth >= 1"),
    ("float-with-wbits", ["method=float", "wbits=1"], 2, "method=float trains float weights"),
    ("ste-without-wbits", ["method=ste"], 2, "needs wbits"),
    ("resume-empty-folder", ["resume={empty_run}"], 2, "no checkpoints/last.pt there"),
    ("model-does-not-fit", ["model=vgg11"], 2, "does not fit data mnist"),
    ("unknown-group-option", ["data=svhn"], 1, "Could not find 'data/svhn'"),
    ("unknown-key", ["nosuchkey=1"], 1, "Could not override 'nosuchkey'"),
]


def call_qtrain(args, capsys):
    sys.argv = ["qtrain", *args]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("case,overrides,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(case, overrides, code, words, roots, mnist_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QTRAIN_DATA", roots["mnist_ok"] if "mnist" not in case else mnist_root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    args = [o.format(**roots) for o in overrides]
    if not any(a.startswith("out_dir=") for a in args):
        args.append(f"out_dir={tmp_path / 'out'}")
    data_roots = [Path(roots[k]) for k in roots if k.startswith(("mnist_", "npz_"))]
    before = {p: sorted(x.name for x in p.rglob("*")) for p in data_roots}
    got, text = call_qtrain([*RUN, *args], capsys)
    assert got == code, text
    assert words in " ".join(text.split()), text
    assert "Traceback" not in text
    if code == 2:  # qtrain's own message: one paragraph
        assert text.strip().startswith("qtrain: error:") and text.count("qtrain: error:") == 1, text
    assert {p: sorted(x.name for x in p.rglob("*")) for p in data_roots} == before  # nothing written into data


def test_enough_cases():
    assert len(CASES) >= 40


def test_phase2_after_the_last_epoch_warns(mnist_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QTRAIN_DATA", mnist_root)
    monkeypatch.chdir(tmp_path)
    code, text = call_qtrain([*RUN, "method=binaryrelax", "wbits=1", "method.phase2_epoch=5", f"out_dir={tmp_path}"],
                             capsys)
    assert code == 0
    assert "phase II" in text and "never starts" in text
