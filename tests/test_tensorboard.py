"""What TensorBoard shows, and per-step LR schedules (which also resume exactly)."""

import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qtrain.run.runner import main_run, train_run

SMALL = ["epochs=2", "data.limit_train=256", "data.limit_test=64", "data.batch_size=32"]


def scalars(run_dir, axis=""):
    """What TensorBoard shows (its purge of events past a resume included) of tb/ or tb/steps/."""
    ea = EventAccumulator(str(run_dir / "tb" / axis), size_guidance={"scalars": 0})
    ea.Reload()
    return ea


def test_tensorboard_tags(make_cfg, mnist_root, tmp_path):
    cfg = make_cfg(*SMALL, f"data.root={mnist_root}", "method=bcgd", "wbits=1", "abits=4", "act.learn_alpha=true",
                   "log_every_n_steps=2")
    train_run(cfg, tmp_path / "run")
    ea = scalars(tmp_path / "run")
    tags = set(ea.Tags()["scalars"])
    for tag in ("train/loss", "train/acc", "test/loss", "test/acc", "lr", "alpha/mean", "alpha/features.2",
                "weights/changed_fraction", "weights_changed/features.0", "hparams/final_test_acc",
                "hparams/best_test_acc"):
        assert tag in tags, tag
    steps = scalars(tmp_path / "run", "steps")  # the optimizer-step axis: a run of its own
    assert set(steps.Tags()["scalars"]) == {"train/loss_step", "train/lr_step"}
    assert [e.step for e in steps.Scalars("train/loss_step")] == [2, 4, 6, 8, 10, 12, 14, 16]  # 8 steps an epoch
    assert "config/text_summary" in ea.Tags()["tensors"]


def test_step_logging_counts_the_runs_optimizer_steps_across_epochs_and_a_resume(make_cfg, mnist_root, tmp_path):
    """log_every_n_steps=5 with 8 steps an epoch: steps 5, 10, 15, 20 of the run (not 5 of each epoch), and
    a run stopped after epoch 1 and resumed continues the count."""
    cfg = make_cfg("epochs=3", "data.limit_train=256", "data.limit_test=32", "data.batch_size=32",
                   f"data.root={mnist_root}", "log_every_n_steps=5")
    train_run(cfg, tmp_path / "whole")
    assert [e.step for e in scalars(tmp_path / "whole", "steps").Scalars("train/loss_step")] == [5, 10, 15, 20]
    cfg.stop_after_epoch = 1
    train_run(cfg, tmp_path / "part")
    cfg.stop_after_epoch = None
    train_run(cfg, tmp_path / "part", resume_dir=tmp_path / "part")
    resumed = scalars(tmp_path / "part", "steps").Scalars("train/loss_step")
    assert [e.step for e in resumed] == [5, 10, 15, 20]
    whole = scalars(tmp_path / "whole", "steps").Scalars("train/loss_step")
    assert [e.value for e in resumed] == [e.value for e in whole]  # the same losses at the same steps


@pytest.mark.parametrize("sched", ["onecycle", "cosine_warmup"])
def test_per_step_schedule_moves_within_an_epoch_and_resumes_exactly(make_cfg, mnist_root, tmp_path, sched):
    extra = ["sched.warmup_steps=3"] if sched == "cosine_warmup" else []
    cfg = make_cfg(*SMALL, f"data.root={mnist_root}", f"sched={sched}", "log_every_n_steps=1", *extra)
    train_run(cfg, tmp_path / "outputs" / "full")
    full = scalars(tmp_path / "outputs" / "full", "steps").Scalars("train/lr_step")
    lrs = [e.value for e in full]
    assert len(lrs) == 16 and len(set(lrs[:8])) > 4  # changes step by step inside epoch 1
    cfg.stop_after_epoch = 1
    train_run(cfg, tmp_path / "outputs" / "part")
    # TensorBoard reads a run's event files in name order: a second-resolution time, then a per-process
    # counter (9 sorts after 10). A real resume is a later process; here, make it at least a later second.
    time.sleep(1.1)
    cfg.stop_after_epoch, cfg.resume = None, True
    main_run(cfg, tmp_path / "outputs" / "new", {})
    a = torch.load(tmp_path / "outputs" / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "outputs" / "part" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # TensorBoard shows the resumed run's whole curves: the resume's purge keeps what came before it
    part = tmp_path / "outputs" / "part"
    assert [(e.step, e.value) for e in scalars(part, "steps").Scalars("train/lr_step")] == \
        [(e.step, e.value) for e in full]
    assert [e.step for e in scalars(part).Scalars("train/loss")] == [1, 2]


def test_progress_bar_shows_loss_acc_img_s_in_that_order(monkeypatch):
    from qtrain.methods import Float
    from qtrain.train import loop as train
    from qtrain.train.tasks import Classification

    class Bar:
        n, posts = 0, []

        def set_postfix(self, post, refresh=False):
            self.posts.append(list(post))

        def update(self, k):
            self.n += k

    model = torch.nn.Linear(4, 3)
    method = Float()
    method.attach(model)
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(5)]
    clock = iter(range(0, 1000, 2))  # every step is "2 s later": a redraw each step
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    bar = Bar()
    t = train.Training(model, method, torch.optim.SGD(model.parameters(), lr=0.1), Classification(),
                       torch.device("cpu"))
    train.train_one_epoch(t, loader, bar=bar)
    assert bar.posts and all(p == ["loss", "acc", "img/s"] for p in bar.posts) and bar.n == 5
