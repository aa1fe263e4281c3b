"""DPF and GMP on LeNet-5 and a real Fashion-MNIST slice, through the public loop API."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from compress import DPF, GMP, CubicSchedule, OneShotMagnitude
from compress.models import build_model
from compress.selection import pruned_count
from compress.training import evaluate


def make(method, steps=48, refresh=4, target=0.9, freeze=None, seed=0):
    torch.manual_seed(seed)
    model = build_model("lenet5", 10, (1, 28, 28))
    schedule = CubicSchedule(target, 0, int(0.75 * steps))
    pruner = method(model, schedule, refresh_every=refresh, freeze_step=freeze)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    return model, pruner, opt


def train_steps(model, pruner, opt, split, steps, watch=None):
    """Run ``steps`` real steps; ``watch(step)`` is called after each."""
    batches = itertools.cycle(list(split.batches(64, shuffle=True,
                                                 generator=torch.Generator().manual_seed(0))))
    for _ in range(steps):
        x, y = next(batches)
        opt.zero_grad()
        with pruner.pruned():
            F.cross_entropy(model(x), y).backward()
        opt.step()
        event = pruner.step()
        if watch:
            watch(event)


def total(pruner):
    return sum(w.numel() for w in pruner.weights.values())


@pytest.mark.parametrize("method", [DPF, GMP])
def test_exact_sparsity_after_every_refresh(method, fmnist_small):
    model, pruner, opt = make(method)
    seen = []

    def check(event):
        if event is None:
            return
        zeros = sum(int((~m).sum()) for m in pruner.masks.values())
        assert zeros == pruned_count(event.target_sparsity, total(pruner))
        with pruner.pruned():
            live_zeros = sum(int((w == 0).sum()) for w in pruner.weights.values())
        assert live_zeros == zeros
        seen.append(event.step)

    train_steps(model, pruner, opt, fmnist_small.train, 48, check)
    assert seen and pruner.sparsity == pytest.approx(0.9, abs=1 / total(pruner))


def test_refresh_period_and_freeze(fmnist_small):
    model, pruner, opt = make(DPF, steps=60, refresh=5, freeze=50)
    steps = []
    train_steps(model, pruner, opt, fmnist_small.train, 60,
                lambda e: steps.append(e.step) if e else None)
    end = pruner.schedule.end_step  # 45
    assert steps == sorted(set(list(range(5, 51, 5)) + [end]))
    assert max(steps) == 50  # nothing after the freeze step


def test_dpf_pruned_weights_keep_learning_gmp_pruned_stay_zero(fmnist_small):
    for method in (DPF, GMP):
        model, pruner, opt = make(method, steps=48)
        train_steps(model, pruner, opt, fmnist_small.train, 36)  # target reached at step 36
        name = "classifier.1.weight"
        pruned = ~pruner.masks[name]
        before = pruner.weights[name].detach().clone()
        train_steps(model, pruner, opt, fmnist_small.train, 3)  # no refresh in between
        after = pruner.weights[name].detach()
        still_pruned = pruned & ~pruner.masks[name]
        moved = (after[still_pruned] != before[still_pruned]).float().mean().item()
        if method is DPF:
            assert moved > 0.9, "pruned dense weights must keep getting the full gradient"
            assert (after[still_pruned] != 0).all()
        else:
            assert moved == 0.0 and (after[still_pruned] == 0).all()


def test_dpf_momentum_lives_on_dense_weights(fmnist_small):
    model, pruner, opt = make(DPF)
    train_steps(model, pruner, opt, fmnist_small.train, 40)
    name = "classifier.1.weight"
    buf = opt.state[pruner.weights[name]]["momentum_buffer"]
    assert (buf[~pruner.masks[name]] != 0).float().mean() > 0.9


def test_gmp_masks_only_shrink(fmnist_small):
    model, pruner, opt = make(GMP)
    previous = {n: m.clone() for n, m in pruner.masks.items()}

    def check(event):
        nonlocal previous
        if event:
            for n, m in pruner.masks.items():
                assert not (m & ~previous[n]).any(), "a GMP weight came back"
            previous = {n: m.clone() for n, m in pruner.masks.items()}

    train_steps(model, pruner, opt, fmnist_small.train, 40, check)


def test_evaluation_leaves_dense_weights_intact(fmnist_small):
    model, pruner, opt = make(DPF)
    train_steps(model, pruner, opt, fmnist_small.train, 40)
    dense = {n: w.detach().clone() for n, w in pruner.weights.items()}
    acc_pruned, _ = evaluate(model, fmnist_small.val, pruner=pruner)
    for n, w in pruner.weights.items():
        assert torch.equal(w.detach(), dense[n])
    assert any((w[~pruner.masks[n]] != 0).any() for n, w in pruner.weights.items())
    pruned_copy = copy.deepcopy(model)
    pruned_copy.load_state_dict(pruner.pruned_state_dict())
    assert evaluate(pruned_copy, fmnist_small.val)[0] == acc_pruned  # the pruned network's
    state = pruner.pruned_state_dict()
    for n in pruner.weights:
        assert int((state[n] == 0).sum()) == int((~pruner.masks[n]).sum())
        assert not torch.signbit(state[n][state[n] == 0]).any()


def test_layer_scope_prunes_each_layer_equally(fmnist_small):
    torch.manual_seed(0)
    model = build_model("lenet5", 10, (1, 28, 28))
    pruner = DPF(model, CubicSchedule(0.9, 0, 0), scope="layer")
    for name, mask in pruner.masks.items():
        assert int((~mask).sum()) == pruned_count(0.9, mask.numel()), name


def test_one_shot_magnitude_mask_is_fixed(fmnist_small):
    torch.manual_seed(0)
    model = build_model("lenet5", 10, (1, 28, 28))
    pruner = OneShotMagnitude(model, 0.95)
    first = {n: m.clone() for n, m in pruner.masks.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model, pruner, opt, fmnist_small.train, 10)
    assert all(torch.equal(first[n], pruner.masks[n]) for n in first)
    assert pruner.sparsity == pytest.approx(0.95, abs=1e-4)
    for n, w in pruner.weights.items():
        assert (w.detach()[~pruner.masks[n]] == 0).all()


def test_freeze_before_target_is_rejected():
    model = build_model("mlpnet", 10, (1, 28, 28))
    with pytest.raises(ValueError, match="freeze"):
        DPF(model, CubicSchedule(0.9, 0, 100), freeze_step=50)


def test_feedback_decay_shrinks_pruned_dense_weights_only():
    torch.manual_seed(0)
    model = build_model("lenet5", 10, (1, 28, 28))
    pruner = DPF(model, CubicSchedule(0.8, 0, 0), feedback_decay=0.5)
    before = {n: w.detach().clone() for n, w in pruner.weights.items()}
    pruner.after_optimizer_step()
    for n, w in pruner.weights.items():
        kept = pruner.masks[n]
        assert torch.equal(w.detach()[kept], before[n][kept])
        assert torch.allclose(w.detach()[~kept], 0.5 * before[n][~kept])
    paper = DPF(build_model("lenet5", 10, (1, 28, 28)), CubicSchedule(0.8, 0, 0),
                feedback_decay=0.0)
    snapshot = {n: w.detach().clone() for n, w in paper.weights.items()}
    paper.after_optimizer_step()
    assert all(torch.equal(w.detach(), snapshot[n]) for n, w in paper.weights.items())
    with pytest.raises(ValueError):
        DPF(model, CubicSchedule(0.8, 0, 0), feedback_decay=1.0)


def test_dpf_refresh_records_largest_pruned_dense_magnitude():
    torch.manual_seed(0)
    model = build_model("lenet5", 10, (1, 28, 28))
    pruner = DPF(model, CubicSchedule(0.8, 0, 0), feedback_decay=0.0)
    assert pruner.history[0].pruned_max == 0.0  # the first mask replaced an all-keep one
    name = "classifier.1.weight"
    w, mask = pruner.weights[name], pruner.masks[name]
    kept_max = max(float(v.detach().abs()[pruner.masks[n]].max())
                   for n, v in pruner.weights.items())
    index = (~mask).nonzero()[0].tolist()
    with torch.no_grad():
        w[tuple(index)] = -7.0  # a pruned weight the feedback let grow
    event = pruner.refresh()
    assert event.pruned_max == 7.0 and event.kept_max == pytest.approx(kept_max)
    assert pruner.masks[name][tuple(index)], "it re-enters at the refresh"
    again = DPF(build_model("lenet5", 10, (1, 28, 28)), CubicSchedule(0.8, 0, 0))
    again.load_state_dict(pruner.state_dict())
    assert again.history[-1].pruned_max == 7.0
    assert "pruned_max" in vars(again.history[-1])
