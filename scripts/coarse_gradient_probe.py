"""Is each STE's coarse gradient a descent direction? A step probe at one point of training.

    python scripts/coarse_gradient_probe.py start experiment=ste/cifar10_resnet20_a2_relu schedule_scale=0.1 \
        pretrain.schedule_scale=1 out_dir=outputs/cifar_full [--batches 32] [--step 0.03 0.1 0.3 1] [--json out.jsonl]
    python scripts/coarse_gradient_probe.py run <run folder> [<run folder> ...] [--json out.jsonl]

``start``: a cell's float model with its quantizers put in (epoch 0 of the cell, the same point for all three
STEs, as quantized_start.py); ``run``: a trained cell's verified checkpoint. Only cells with float weights
(method=float, the [STE] cells) are probed: their quantized activations are the only thing an STE changes.

At the model's weights w, for each of the three [STE] estimators (identity, relu, clipped_relu: the forward is
the same staircase, only the backward differs) the script takes the coarse gradient g of the training loss over
``--batches`` training batches (the run's own, augmented, epoch 0's order), as one training step would see it
(the batch norms on batch statistics). It then moves the weights a distance t (Euclidean, over all trained
weights) along -g, for each ``--step`` t, and measures the training loss on ``--batches`` *other* training
batches (the probe set, the same for every estimator) against the loss at w:

* ``realised``: L(w - t g/|g|) - L(w) on the probe set; negative means the step went downhill.
* ``random``: the same for a random direction (one per t, the same for every estimator). The loss of a network
  with quantized activations is piecewise constant in its weights, so even a step that points nowhere changes
  it; ``random`` is that noise floor, and a direction is only downhill by as much as it beats it.
* ``promised``: -t <g1, g2> / |g|, the first-order decrease a true gradient would give (g1, g2: the gradients of
  the two halves of the gradient set, whose product estimates |E g|^2 without the batch noise). ``ratio`` =
  realised / promised: near 1 is what an honest gradient does at a small step.
* ``|g|`` (so plain SGD at learning rate lr moves the weights lr |g|), ``consistency`` cos(g1, g2) (how much of
  g is signal rather than batch noise), and the cosines between the three estimators' gradients, over all
  weights and per layer.

No momentum, no weight decay: the probe measures directions, not the optimizer. Nothing is saved; the model is
put back after every step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from qtrain.errors import QtrainError

STES = ("identity", "relu", "clipped_relu")


def _set_ste(model, ste: str) -> int:
    """Give every quantized activation the estimator ``ste`` (reference implementation); returns how many."""
    from qtrain.quant.act import QuantReLU

    n = 0
    for m in model.modules():
        if isinstance(m, QuantReLU):
            m.ste, n = ste, n + 1
            m.implemented_by("reference")  # not in place: the probe runs forwards without a backward
    return n


def _mean_loss(model, batches, task) -> float:
    with torch.no_grad():
        total = sum(float(task.loss(model(x), y)) * len(y) for x, y in batches)
    return total / sum(len(y) for _, y in batches)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def coarse_gradient(model, batches, task, params) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean gradient of each half of ``batches``, flattened over ``params``."""
    halves = []
    for part in (batches[: len(batches) // 2], batches[len(batches) // 2:]):
        model.zero_grad(set_to_none=True)
        n = sum(len(y) for _, y in part)
        for x, y in part:
            (task.loss(model(x), y) * (len(y) / n)).backward()
        halves.append(torch.cat([p.grad.flatten() for p in params]).double())
    model.zero_grad(set_to_none=True)
    return halves[0], halves[1]


def _loss_after(model, params, sizes, direction, t, batches, task, saved) -> float:
    """The probe set's loss at w - t * direction / |direction| (the model put back after)."""
    with torch.no_grad():
        unit = direction / direction.norm()
        for p, d in zip(params, torch.split(unit, sizes)):
            p.sub_(t * d.view_as(p).to(p.dtype))
    try:
        return _mean_loss(model, batches, task)
    finally:
        model.load_state_dict(saved)


def probe(model, task, grad_batches, probe_batches, steps, seed: int = 0) -> dict:
    """The probe of the module docstring at the model's current weights (restored on return)."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = [p.numel() for p in params]
    model.train()  # the training forward: batch statistics, as one step of training sees the loss
    grads, out = {}, {"estimators": {}}
    try:
        base = _mean_loss(model, probe_batches, task)
        model.load_state_dict(saved)
        out["loss"] = base
        out["weight_norm"] = float(torch.cat([p.detach().flatten() for p in params]).double().norm())
        noise = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out["random"] = [{"step": t, "realised": _loss_after(model, params, sizes, noise, t, probe_batches, task,
                                                             saved) - base} for t in steps]
        for ste in STES:
            _set_ste(model, ste)
            g1, g2 = coarse_gradient(model, grad_batches, task, params)
            model.load_state_dict(saved)  # (the forwards moved the running statistics)
            g = (g1 + g2) / 2
            grads[ste] = g
            signal = float(torch.dot(g1, g2))
            rows = []
            for t in steps:
                realised = _loss_after(model, params, sizes, g, t, probe_batches, task, saved) - base
                promised = -t * signal / float(g.norm())
                rows.append({"step": t, "realised": realised, "promised": promised,
                             "ratio": realised / promised if signal > 0 else None})
            out["estimators"][ste] = {"norm": float(g.norm()), "consistency": _cos(g1, g2), "signal": signal,
                                      "steps": rows}
        out["cosines"] = {f"{a}|{b}": _cos(grads[a], grads[b]) for a, b in itertools.combinations(STES, 2)}
        out["layers"] = {}
        for name, *parts in zip(names, *(torch.split(grads[s], sizes) for s in STES)):
            layer = dict(zip(STES, parts))
            out["layers"][name] = {"norms": {s: float(v.norm()) for s, v in layer.items()},
                                   **{f"cos {a}|{b}": _cos(layer[a], layer[b])
                                      for a, b in itertools.combinations(STES, 2)}}
    finally:
        model.load_state_dict(saved)
        model.eval()
    return out


def _batches(data, n: int) -> tuple[list, list]:
    data.train.set_epoch(0)
    batches = list(itertools.islice(data.train, 2 * n))
    if len(batches) < 2 * n:
        raise QtrainError(f"--batches {n}: the training split has only {len(batches)} batches; the probe needs "
                          f"2 x {n} (a gradient set and a probe set).")
    return batches[:n], batches[n:]


def _check(cfg, method, n_act: int) -> None:
    if method.name != "float" or cfg.wbits is not None:
        raise QtrainError(f"method={method.name}, wbits={cfg.wbits}: the probe is for cells with float weights "
                          "(the [STE] cells), where the STE is the only estimated part of the gradient.")
    if n_act == 0:
        raise QtrainError("the model has no quantized activation (abits=null?): there is no STE to probe.")


def probe_run(path: Path, n: int, steps) -> dict:
    from qtrain.tools.eval import load_run

    ckpt, state, cfg, data, model, _, method, task = load_run(path, limit_train=None)
    _check(cfg, method, _set_ste(model, cfg.ste.name))
    grad_batches, probe_batches = _batches(data, n)
    return {"what": "run", "checkpoint": str(ckpt), "epoch": state.get("epoch"), "trained_with": cfg.ste.name,
            "abits": cfg.abits, **probe(model, task, grad_batches, probe_batches, steps)}


def probe_start(overrides: list[str], n: int, steps) -> dict:
    from qtrain.tools.eval import load_start

    cfg, built, run_dir = load_start(overrides, limit_train=None)
    _check(cfg, built.method, _set_ste(built.model, cfg.ste.name))
    grad_batches, probe_batches = _batches(built.data, n)
    return {"what": "start", "float_model": str(run_dir), "overrides": overrides, "abits": cfg.abits,
            **probe(built.model, built.task, grad_batches, probe_batches, steps)}


def print_table(r: dict, flush: bool = False) -> None:
    print(f"{r['what']}: {r.get('checkpoint') or r.get('float_model')}  (a{r['abits']}; training loss at w: "
          f"{r['loss']:.4f} on the probe set; |w| {r['weight_norm']:.2f})")
    head = "  ".join(f"{'t ' + format(row['step'], 'g') + ': realised / promised':>30s}" for row in r["random"])
    print(f"{'direction':13s} {'|g|':>10s} {'cons.':>6s}  {head}")
    for ste, e in r["estimators"].items():
        cells = "  ".join(f"{row['realised']:+.4f} / {row['promised']:+.4f}".rjust(30) for row in e["steps"])
        print(f"{ste:13s} {e['norm']:10.4f} {e['consistency']:6.3f}  {cells}")
    cells = "  ".join(f"{row['realised']:+.4f}".ljust(17).rjust(30) for row in r["random"])
    print(f"{'random':13s} {'':10s} {'':6s}  {cells}")
    print("cosines: " + ", ".join(f"{k} {v:+.3f}" for k, v in r["cosines"].items()), flush=flush)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("run", "start"), help="a trained cell's run folder, or a cell's quantized start")
    p.add_argument("args", nargs="+", help="run: run folders or checkpoints; start: the cell's overrides")
    p.add_argument("--batches", type=int, default=32, help="training batches in the gradient set and in the probe set")
    p.add_argument("--step", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0],
                   help="the step lengths probed (Euclidean norm of the weight change)")
    p.add_argument("--json", type=Path, help="also append the result here, one JSON object per line")
    a = p.parse_args(argv)
    if a.batches < 2:
        print(f"coarse_gradient_probe: error: --batches {a.batches}: at least 2 (the gradient set is split in two "
              "halves).", file=sys.stderr)
        sys.exit(QtrainError.exit_code)
    # one at a time, each written as soon as it is measured (a probe takes minutes on a CPU)
    jobs = [lambda path=path: probe_run(Path(path), a.batches, a.step) for path in a.args] if a.what == "run" \
        else [lambda: probe_start(a.args, a.batches, a.step)]
    for job in jobs:
        try:
            r = job()
        except QtrainError as e:
            print(f"coarse_gradient_probe: error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        r.update(batches=a.batches, torch=torch.__version__, threads=torch.get_num_threads())
        print_table(r, flush=True)
        if a.json:
            with a.json.open("a") as f:
                f.write(json.dumps(r) + "\n")

if __name__ == "__main__":
    main()
