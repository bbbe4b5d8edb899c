"""Methods on a tiny layer, a few steps: the invariants of STE, BinaryRelax and BCGD."""

import torch
from torch import nn

from qtrain.methods import BCGD, STE, BinaryRelax
from qtrain.quant.weight import binary


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 4, bias=True), nn.ReLU(), nn.Linear(4, 2))


def step(model, method, opt, x, y):
    method.prepare_forward()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    method.before_step()
    opt.step()
    method.after_step()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, generator=g), torch.randint(0, 2, (16,), generator=g)


def test_bcgd_update_is_blend_minus_lr_grad():
    model, rho, lr = tiny(), 0.3, 0.05
    method = BCGD(rho=rho)
    method.attach(model, binary, ["0.weight"])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    w = model[0].weight.detach().clone()
    x, y = batch()
    # the coarse gradient: gradient of the loss at Q(w)
    ref = tiny()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref[0].weight.copy_(binary(w))
    nn.functional.cross_entropy(ref(x), y).backward()
    step(model, method, opt, x, y)
    expected = (1 - rho) * w + rho * binary(w) - lr * ref[0].weight.grad
    assert torch.allclose(model[0].weight, expected, atol=1e-6)


def test_bcgd_with_rho_zero_equals_ste():
    a, b = tiny(), tiny()
    ma, mb = BCGD(rho=0.0), STE()
    ma.attach(a, binary, ["0.weight", "2.weight"])
    mb.attach(b, binary, ["0.weight", "2.weight"])
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for s in range(5):
        x, y = batch(s)
        step(a, ma, oa, x, y)
        step(b, mb, ob, x, y)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_ste_keeps_latent_weights_and_evaluates_binary():
    model = tiny()
    method = STE()
    method.attach(model, binary, ["0.weight"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(3):
        step(model, method, opt, *batch(s))
    latent = model[0].weight.detach().clone()
    assert torch.unique(latent).numel() > 2  # the optimizer moved the float weights
    (prefix, ctx), = method.evaluations()
    with ctx:
        assert prefix == "test" and torch.unique(model[0].weight).numel() == 2
        assert torch.equal(model[0].weight, binary(latent))
    assert torch.equal(model[0].weight, latent)  # restored after evaluation


def test_binaryrelax_surrogate_and_lambda_schedule():
    model = tiny()
    method = BinaryRelax(lambda0=1.0, growth=1.04, phase2_epoch=3)
    method.attach(model, binary, ["0.weight"])
    w = model[0].weight.detach().clone()
    for epoch, lam in ((0, 1.0), (1, 1.04), (2, 1.04**2)):
        method.on_epoch_start(epoch)
        assert abs(method.lam - lam) < 1e-12 and method.phase == 1
    method.prepare_forward()  # u = (lam Q(w) + w) / (lam + 1)
    assert torch.allclose(model[0].weight, (1.04**2 * binary(w) + w) / (1.04**2 + 1))
    method.before_step()
    assert torch.equal(model[0].weight, w)
    assert [p for p, _ in method.evaluations()] == ["test", "test_relaxed"]
    method.on_epoch_start(3)  # phase II: u = Q(w), lambda frozen
    assert method.phase == 2 and abs(method.lam - 1.04**3) < 1e-12
    method.prepare_forward()
    assert torch.equal(model[0].weight, binary(w))
    assert [p for p, _ in method.evaluations()] == ["test"]


def test_binaryrelax_state_round_trip():
    a = BinaryRelax(phase2_epoch=10)
    a.attach(tiny(), binary, ["0.weight"])
    a.on_epoch_start(7)
    b = BinaryRelax(phase2_epoch=10)
    b.attach(tiny(), binary, ["0.weight"])
    b.load_state_dict(a.state_dict())
    assert b.lam == a.lam and b.phase == a.phase


def test_binary_layer_has_two_values_after_steps():
    model = tiny()
    method = BCGD()
    method.attach(model, binary, ["0.weight"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method.on_epoch_start(0)
    for s in range(4):
        step(model, method, opt, *batch(s))
    scalars = method.on_epoch_end(0)
    assert 0 <= scalars["weights/changed_fraction"] <= 1 and scalars["bcgd/rho"] == 1e-5
    with method.evaluations()[0][1]:
        values = torch.unique(model[0].weight)
    assert values.numel() == 2 and torch.allclose(values[0], -values[1])
