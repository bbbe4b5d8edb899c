"""scripts/epoch_draw_loss.py: a fixed model's training loss on each epoch's data draw."""

import json
from pathlib import Path

import pytest

from qtrain.errors import QtrainError
from qtrain.run.runner import train_run


@pytest.fixture
def script(load_script):
    return load_script("epoch_draw_loss")


def test_a_run_that_does_not_move_its_weights_logs_exactly_its_start_models_draw_losses(script, make_cfg,
                                                                                        fake_cifar_root, tmp_path,
                                                                                        capsys, caplog):
    data = [f"data.root={fake_cifar_root}", "data.batch_size=16"]
    start = train_run(make_cfg("experiment=ste/cifar10_resnet20_a4_clipped_relu", "init=null", "epochs=1", *data),
                      tmp_path / "start")
    ckpt = Path(start["run_dir"]) / "checkpoints" / "last.pt"
    # the §4.2 control at lr 1e-30 (0 is refused): an update far below float32 rounding, so the weights never
    # change and each epoch's logged loss is the draw's alone
    run = ["experiment=ste/cifar10_resnet20_a4_instability_control", f"init={ckpt}", "epochs=3", "optim.lr=1e-30",
           *data]
    with caplog.at_level("WARNING", logger="qtrain"):
        train_run(make_cfg(*run), tmp_path / "control")
    # the run is told that it replays its start's draws, and what to read its training loss against
    assert any("sees its batches again" in r.getMessage() and "epoch_draw_loss.py" in r.getMessage()
               for r in caplog.records)
    logged = [json.loads(x) for x in (tmp_path / "control" / "metrics.jsonl").read_text().splitlines()]
    draws = list(script.draw_losses(run, [1, 2, 3]))
    assert [d["epoch"] for d in draws] == [1, 2, 3] and all(d["images"] == 64 for d in draws)
    for row, draw in zip(logged, draws):
        assert draw["train_loss"] == pytest.approx(row["train/loss"], rel=1e-5)
        assert draw["train_acc"] == pytest.approx(row["train/acc"])
    assert len({round(d["train_loss"], 6) for d in draws}) == 3  # the draws differ (order, crops, flips)
    # the table: the run's loss beside the draw's, difference about zero
    (tmp_path / "draws.jsonl").write_text("".join(json.dumps(d) + "\n" for d in draws))
    script.main(["table", str(tmp_path / "draws.jsonl"), str(tmp_path / "control")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| epoch | fixed model on the epoch's draw | control: loss (Δ)") and len(lines) == 5
    assert all(line.endswith("(+0.0000) |") or line.endswith("(-0.0000) |") for line in lines[2:])


def test_epochs_argument_and_a_missing_init_are_clear_errors(script):
    assert script.epoch_numbers("1-3,8") == [1, 2, 3, 8]
    for bad in ("0-2", "one", "3-1"):
        with pytest.raises(QtrainError, match="1-based"):
            script.epoch_numbers(bad)
    with pytest.raises(QtrainError, match="give init="):
        next(script.draw_losses(["experiment=ste/cifar10_resnet20_a4_clipped_relu"], [1]))


def test_the_replay_warning_is_for_the_same_seed_and_data_only(make_cfg):
    from qtrain.run.build import replayed_draws

    cfg = make_cfg("experiment=ste/cifar10_resnet20_a4_instability_control", "init=x.pt")
    start = {"seed": cfg.seed, "data": {"_target_": cfg.data._target_, "limit_train": cfg.data.get("limit_train")}}
    assert "seed= for fresh draws" in replayed_draws(cfg, start)
    assert replayed_draws(cfg, {**start, "seed": cfg.seed + 1}) is None
    assert replayed_draws(cfg, {**start, "data": {"_target_": "qtrain.data.builtin.mnist"}}) is None
    assert replayed_draws(cfg, {**start, "data": {**start["data"], "limit_train": 1000}}) is None
    assert replayed_draws(cfg, None) is None  # a bare state dict: nothing known about its draws
