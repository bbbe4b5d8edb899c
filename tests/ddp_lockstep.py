"""Lock-step check of a data-parallel step against a single-process step (test_distributed.py).

Two Gloo ranks train qtrain's own model, method and optimizer (built by build.build, sharded,
wrapped by parallel.ranks.Ranks.wrap, stepped by train.train_one_epoch). Before every step, rank 0
copies the run's whole state (weights, batch-norm buffers, optimizer, method) into a second,
single-process copy, which takes the same global batch in one piece. After the step the two
states are compared. Comparing step by step, from the same state, measures what data parallelism
changes in one update -- float summation order only -- rather than how fast this (chaotic)
training amplifies a difference in the last bit (see docs/SCALING.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys

import torch

_proxy_calls = 0


def crash_on_rank_1(x):
    """An STE proxy (softplus) that raises on rank 1 in its 20th backward call: a worker that crashes
    mid-training (test_distributed.py)."""
    global _proxy_calls
    _proxy_calls += 1
    if os.environ.get("RANK") == "1" and _proxy_calls > 20:
        raise RuntimeError("injected failure on rank 1")
    return torch.nn.functional.softplus(x)


class OneBatch:
    """A loader of one batch, with the loss weight the real loader gives that batch."""

    def __init__(self, batch, weight):
        self.batch, self.weight = batch, weight

    def __iter__(self):
        yield self.batch

    def __len__(self):
        return 1

    def loss_weight(self, i):
        return self.weight


def _config(overrides):
    from hydra import compose, initialize_config_dir

    import qtrain.cli  # noqa: F401  (registers the config's resolvers)

    with initialize_config_dir(config_dir=str(qtrain.keys.CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _max_difference(a: dict, b: dict) -> tuple[float, str]:
    return max((float((a[k].double() - b[k].double()).abs().max()), k) for k in a if a[k].is_floating_point())


def _digest(model, method) -> str:
    """A hash of the weights, batch-norm buffers and method state: equal on all ranks after a step."""
    h = hashlib.sha256()
    for t in list(model.state_dict().values()) + [v for v in method.state_dict().values() if torch.is_tensor(v)]:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _lockstep_case(ranks, world: int, overrides: list) -> dict:
    """One method's steps in lock-step. A function of its own, so that its DDP model (and the Gloo
    work its reducer holds) is freed when it returns, not at interpreter shutdown."""
    from qtrain.parallel import ranks as distributed
    from qtrain.run import build
    from qtrain.train.loop import Classification, Training, train_one_epoch

    cpu = torch.device("cpu")
    cfg = _config(overrides)
    build.seed_everything(cfg.seed)
    own = build.build(cfg, cpu)  # this rank's shard
    data, model, method, opt, sched = own.data, own.model, own.method, own.optimizer, own.scheduler
    ddp = ranks.wrap(model, cpu, sync_bn=True)
    if ranks.is_main:  # the single-process copy, with the whole batch
        distributed._current = distributed.SINGLE
        build.seed_everything(cfg.seed)
        r = build.build(cfg, cpu)
        r_data, r_model, r_method, r_opt, r_sched = r.data, r.model, r.method, r.optimizer, r.scheduler
        distributed._current = ranks
    worst, per_step, ranks_agree = (0.0, ""), [], True
    for epoch in range(cfg.epochs):
        data.train.set_epoch(epoch)
        method.on_epoch_start(epoch)
        batches = iter(data.train)
        if ranks.is_main:
            r_data.train.set_epoch(epoch)
            r_method.on_epoch_start(epoch)
            r_batches = iter(r_data.train)
        for b in range(len(data.train)):
            if ranks.is_main:
                r_model.load_state_dict(model.state_dict())
                # deep copies: load_state_dict would share the momentum buffers themselves
                r_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
                r_method.load_state_dict(copy.deepcopy(method.state_dict()))
            train_one_epoch(Training(ddp, method, opt, Classification(), cpu, ranks=ranks),
                            OneBatch(next(batches), data.train.loss_weight(b)))
            digests = [None] * world
            torch.distributed.all_gather_object(digests, _digest(model, method))
            ranks_agree = ranks_agree and len(set(digests)) == 1
            if ranks.is_main:
                train_one_epoch(Training(r_model, r_method, r_opt, Classification(), cpu),
                                OneBatch(next(r_batches), 1.0))
                diff = _max_difference(model.state_dict(), r_model.state_dict())
                worst = max(worst, diff)
                per_step.append(diff[0])
        sched.step()
        if ranks.is_main:
            r_sched.step()
    return {"steps": len(per_step), "max_abs_difference": worst[0], "where": worst[1],
            "ranks_identical": ranks_agree, "per_step": per_step}


def worker(rank: int, world: int, port: int, cases: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from qtrain.parallel import ranks as distributed

    ranks = distributed.join(120)
    finished = False
    try:
        report = {name: _lockstep_case(ranks, world, overrides) for name, overrides in cases.items()}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(report, f, indent=2)
        finished = True
    finally:
        distributed.leave(finished)  # (rank 1 is done first: it waits for rank 0 before tearing Gloo down)


def run_lockstep(cases: dict, out: str, port: int) -> dict:
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(2, port, cases, out), nprocs=2, join=True, start_method="spawn")
    with open(out) as f:
        return json.load(f)


if __name__ == "__main__":  # python -m tests.ddp_lockstep DATA_ROOT: the table in docs/SCALING.md
    root = sys.argv[1]
    common = [f"data.root={root}", "data.limit_train=1301", "data.limit_test=100", "epochs=2", "channels_last=false"]
    cases = {"float": common + ["abits=null"], "ste": common + ["method=ste", "wbits=1"],
             "binaryrelax": common + ["method=binaryrelax", "wbits=1", "method.phase2_epoch=1"],
             "bcgd": common + ["method=bcgd", "wbits=1", "abits=4", "act.learn_alpha=true"]}
    print(json.dumps(run_lockstep(cases, "/tmp/qtrain_lockstep.json", 29533), indent=2))


def stall_on_rank_1(x):
    """An STE proxy (softplus) that stops answering on rank 1 for 60 s in its 20th backward call."""
    global _proxy_calls
    _proxy_calls += 1
    if os.environ.get("RANK") == "1" and _proxy_calls == 21:
        import time

        time.sleep(60)
    return torch.nn.functional.softplus(x)
