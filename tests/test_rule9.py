"""DESIGN.md rule 9, enforced: every defense (reference and fast) reads its clean data only through the loop
helper's ``loop.batches`` (or ``loop.probe``) and changes the model's weights only at ``loop.step`` or inside
``loop.writing`` — the precondition of the data-parallel runs (tests/test_distributed.py). The guard
(``FASTPURIFY_RULE9_GUARD=1``) hands the defense a view of the data readable only with the index tensors the
loop handed out, and compares the weights before every step and write with what the last one left."""

import pytest
import torch
import torch.nn.functional as F
from _tiny import tiny_cnn

import fastpurify
from fastpurify.data import synthetic_dataset
from fastpurify.defenses._loop import RuleNineError, run_defense
from fastpurify.reference import defenses as ref

SETTINGS = {
    "sau": dict(epochs=2, batch_size=16, pgd_steps=2, train_mode=True),
    "ibau": dict(epochs=2, batch_size=16, K=2),
    "awm": dict(epochs=2, batch_size=16, inner=1, shrink_steps=1),
    "baerase": dict(epochs=2, batch_size=16, recovery_epochs=1, hidden_size=32, noise_dim=8, target=0),
    "bcu": dict(epochs=2, batch_size=16),
}


@pytest.fixture
def guard(monkeypatch):
    monkeypatch.setenv("FASTPURIFY_RULE9_GUARD", "1")


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("defense", sorted(SETTINGS))
def test_every_defense_keeps_rule_9(defense, impl, guard):
    x, y = synthetic_dataset(n=48, seed=2)
    fn = getattr(ref if impl == "reference" else fastpurify, defense)
    r = fn(tiny_cnn(16, seed=0).eval(), x if defense == "bcu" else (x, y), progress=False, **SETTINGS[defense])
    assert r.status == "completed" and 1 <= len(r.history) <= 2  # BAERASE may stop early (its flip-rate rule)


def _run(algorithm):
    import dataclasses

    cfg = dataclasses.make_dataclass("Cfg", [("epochs", int, 1), ("batch_size", int, 16)])
    cfg.validate = lambda self: None
    x, y = synthetic_dataset(n=32, seed=2)
    return run_defense("toy", algorithm, cfg, tiny_cnn(16, seed=0).eval(), (x, y), progress=False)


def _sgd_round(net, data, loop, opt):
    for idx in loop.batches(len(data), 16):
        loop.step(opt, F.cross_entropy(net(data.x[idx]), data.y[idx]))


def test_the_guard_catches_a_weight_written_outside_the_step(guard):
    def algorithm(net, data, cfg, loop):
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in loop.rounds():
            _sgd_round(net, data, loop, opt)
            with torch.no_grad():
                net[0].weight.mul_(0.5)  # not at loop.step, not in loop.writing

    with pytest.raises(RuleNineError, match=r"the weight (1\.)?0\.weight changed outside loop.step"):
        _run(algorithm)


def test_the_guard_catches_data_read_outside_the_loop(guard):
    def algorithm(net, data, cfg, loop):
        net(data.x[:2])  # a slice, not an index the loop handed out

    with pytest.raises(RuleNineError, match="not with an index loop.batches handed out"):
        _run(algorithm)


def test_writes_inside_loop_writing_and_steps_pass(guard):
    def algorithm(net, data, cfg, loop):
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in loop.rounds():
            _sgd_round(net, data, loop, opt)
        with torch.no_grad(), loop.writing("scale"):
            net[0].weight.mul_(0.5)

    assert _run(algorithm).status == "completed"


def test_without_the_guard_nothing_is_checked(monkeypatch):
    monkeypatch.delenv("FASTPURIFY_RULE9_GUARD", raising=False)

    def algorithm(net, data, cfg, loop):
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in loop.rounds():
            _sgd_round(net, data, loop, opt)
            net(data.x[:2])

    assert _run(algorithm).status == "completed"
