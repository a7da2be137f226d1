"""Which fastpurify ops each fast defense reaches (issue 13, item 16), so that the docs say exactly that.

Every op resolves its backend through ``fastpurify.backend.resolve`` when it is called; recording those calls
while a fast defense runs one tiny round gives the ops it reaches. ``backend.plan`` (the check of every declared
op before any work) also calls ``resolve``; those calls are recorded apart, as what the defense declared.
The table of docs/backends.md between ``<!-- defense-ops:begin -->`` and ``<!-- defense-ops:end -->`` must match.
"""

import re
from pathlib import Path

import pytest
import torch
from _tiny import tiny_cnn

import fastpurify
from fastpurify import backend
from fastpurify.defenses import DEFENSES

README = Path(__file__).resolve().parents[1] / "docs" / "backends.md"  # the README links to it

# The ops each fast defense's default configuration reaches on CPU tensors. On launch-bound devices (CUDA) SAU's
# shared PGD also runs the fused loss kernel (dual_logit_loss); nothing else depends on the device.
OPS_REACHED = {
    "sau": {"pgd_update"},
    "ibau": {"universal_update"},  # the default fixed-point hypergradient uses no CG kernel
    "awm": {"universal_update", "build_masked_weights", "mask_grads", "masked_adam_clamp"},  # not masked_conv2d
    "baerase": set(),  # PyTorch's own operators only
    "bcu": set(),
}
# Options that reach more ops: (defense, settings, ops reached).
OPTIONS_REACHED = [("ibau", {"solver": "cg"}, {"universal_update", "cg_step", "cg_direction"})]
# A few dozen images, one round, the shortest inner schedules: enough to run every phase once.
TINY = {"sau": {}, "ibau": {}, "awm": {"inner": 1}, "baerase": {"target": 0, "recovery_epochs": 1, "hidden_size": 32},
        "bcu": {}}


@pytest.fixture
def recorder(monkeypatch):
    """``reached``: the ops resolved while the defense ran; ``planned``: those its up-front plan resolved."""
    rec = {"reached": set(), "planned": set(), "in_plan": False}
    resolve, plan = backend.resolve, backend.plan

    def recording_resolve(op, *args, **kwargs):
        rec["planned" if rec["in_plan"] else "reached"].add(op)
        return resolve(op, *args, **kwargs)

    def recording_plan(who, ops, *args, **kwargs):
        rec["planned"].update(ops)
        rec["in_plan"] = True
        try:
            return plan(who, ops, *args, **kwargs)
        finally:
            rec["in_plan"] = False

    monkeypatch.setattr(backend, "resolve", recording_resolve)
    monkeypatch.setattr(backend, "plan", recording_plan)
    return rec


def _run_tiny(name: str, **settings):
    torch.manual_seed(0)
    x = torch.rand(48, 3, 32, 32)
    y = torch.arange(48) % 10
    result = getattr(fastpurify, name)(tiny_cnn(seed=0), x if name == "bcu" else (x, y), epochs=1, batch_size=16,
                                       progress=False, **{**TINY[name], **settings})
    assert result.status == "completed"


@pytest.mark.parametrize("name", DEFENSES)
def test_fast_defense_reaches_exactly_these_ops(name, recorder, one_thread):
    assert fastpurify.defenses.FAST_PATHS[name]
    _run_tiny(name)
    assert recorder["reached"] == OPS_REACHED[name]


@pytest.mark.parametrize("name,settings,ops", OPTIONS_REACHED)
def test_options_that_reach_more_ops(name, settings, ops, recorder, one_thread):
    _run_tiny(name, **settings)
    assert recorder["reached"] == ops


@pytest.mark.parametrize("name", DEFENSES)
def test_every_op_reached_was_checked_before_work(name, recorder, one_thread):
    _run_tiny(name)
    missing = recorder["reached"] - recorder["planned"]
    assert not missing, f"ops reached but not checked before work: {missing}"


def _readme_table():
    text = README.read_text()
    block = re.search(r"<!-- defense-ops:begin -->(.*?)<!-- defense-ops:end -->", text, re.S)
    assert block, f"{README} has no defense-ops table (<!-- defense-ops:begin --> ... <!-- defense-ops:end -->)"
    rows = {}
    for line in block.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].lower() in DEFENSES:
            rows[cells[0].lower()] = set(re.findall(r"`([a-z_0-9]+)`", cells[1]))
    return rows


def test_readme_table_says_which_defense_uses_which_op():
    assert _readme_table() == OPS_REACHED


def test_shared_pgd_backend_reaches_the_fused_loss(recorder, monkeypatch):
    """SharedPGD(backend=...) used to leave dual_logit_loss on the automatic choice. The fused loss runs where
    backend.launch_bound says so (CUDA); pretend this CPU is launch-bound to run that path here."""
    from fastpurify.ops import SharedPGD

    monkeypatch.setattr(backend, "launch_bound", lambda device: True)
    chosen = []
    resolve = backend.resolve

    def spy(op, *args, **kwargs):
        name = resolve(op, *args, **kwargs)
        chosen.append((op, name))
        return name

    monkeypatch.setattr(backend, "resolve", spy)
    f, f0 = tiny_cnn(seed=1).eval(), tiny_cnn(seed=2).eval()
    SharedPGD(f, f0, steps=2, backend="torch", early_exit="device")(torch.rand(6, 3, 32, 32), torch.arange(6))
    assert ("dual_logit_loss", "torch") in chosen and ("pgd_update", "torch") in chosen
    assert all(name == "torch" for _, name in chosen), chosen
