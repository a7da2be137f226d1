"""Recipes (``recipe="published" | "robust"``, fastpurify/recipes.py) and the one call that purifies
(``fastpurify.purify``, fastpurify/auto.py): which settings a recipe sets, that the caller's win, that the
references refuse anything but the published algorithm, what ``purify`` runs, how it splits a time budget
(on an injected clock), and that it never hands back a changed model after a failure."""

import json

import pytest
import torch
from _tiny import tiny_cnn
from test_time_budget import Clocked, FakeClock

import fastpurify
from fastpurify import recipes
from fastpurify.auto import PLAN
from fastpurify.data import synthetic_dataset
from fastpurify.reference import defenses as ref

pytestmark = pytest.mark.usefixtures("one_thread")

_X, _Y = synthetic_dataset(n=64, seed=3)
_SMALL = {"batch_size": 32}


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_published_is_the_defaults_and_every_defense_has_it():
    for d, names in recipes.available().items():
        assert names[0] == "published"
        assert recipes.recipe_settings(d, "published") == {}


def test_every_robust_setting_is_a_field_of_the_fast_config():
    import dataclasses
    import importlib

    for d, settings in recipes.ROBUST.items():
        cfg = getattr(importlib.import_module(f"fastpurify.defenses.{d}"), f"Fast{d.upper()}Config")
        fields = {f.name for f in dataclasses.fields(cfg)}
        assert set(settings) <= fields, (d, set(settings) - fields)
        cfg(**settings).validate()


def test_robust_recipe_sets_its_settings_and_the_callers_win():
    d = next(iter(recipes.ROBUST))
    settings = recipes.ROBUST[d]
    r = getattr(fastpurify, d)(tiny_cnn(seed=0), (_X, _Y), recipe="robust", epochs=1, progress=False, **_SMALL)
    assert r.info["recipe"] == "robust"
    for k, v in settings.items():
        assert r.config[k] == (1 if k == "epochs" else v), k
    assert len(r.history) == 1  # epochs=1 given: wins over the recipe's epochs
    key = next(k for k in settings if k != "epochs")
    mine = {"outer_portion": 0.25}.get(key)
    if mine is not None:
        r2 = getattr(fastpurify, d)(tiny_cnn(seed=0), (_X, _Y), recipe="robust", epochs=1, progress=False,
                                    **{key: mine}, **_SMALL)
        assert r2.config[key] == mine


def test_published_recipe_is_the_default_run_bit_for_bit():
    a = fastpurify.ibau(tiny_cnn(seed=0), (_X, _Y), epochs=1, progress=False, **_SMALL)
    b = fastpurify.ibau(tiny_cnn(seed=0), (_X, _Y), epochs=1, progress=False, recipe="published", **_SMALL)
    assert a.info["recipe"] == b.info["recipe"] == "published"
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k


def test_ibau_finetune_tail_runs_in_the_last_round_through_the_loop():
    """The robust recipe's clean fine-tuning tail: only in the last round, logged, changes the model, and is a
    checked option (0 keeps the published algorithm bit for bit: test_published_recipe_is_the_default_run...)."""
    a = fastpurify.ibau(tiny_cnn(seed=0), (_X, _Y), epochs=2, progress=False, **_SMALL)
    b = fastpurify.ibau(tiny_cnn(seed=0), (_X, _Y), epochs=2, progress=False, finetune_epochs=1, finetune_lr=1e-3,
                        **_SMALL)
    assert "finetune_loss" not in b.history[0] and b.history[1]["finetune_loss"] > 0
    assert "finetune_loss" not in a.history[1]
    assert b.history[0]["loss"] == a.history[0]["loss"]  # the rounds before the tail are the same run
    assert any(not torch.equal(va, vb) for va, vb in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    for bad, match in (({"finetune_epochs": -1}, "finetune_epochs must be a non-negative integer"),
                       ({"finetune_epochs": 1.5}, "finetune_epochs must be an integer"),
                       ({"finetune_lr": 0}, "finetune_lr must be a positive number")):
        with pytest.raises((ValueError, TypeError), match=match):
            fastpurify.ibau(tiny_cnn(seed=0), (_X, _Y), progress=False, **bad)


@pytest.mark.parametrize("bad", ["fast", "ROBUST", 1, None])
def test_unknown_recipe_is_an_error_before_any_work(bad):
    m = tiny_cnn(seed=0)
    before = _weights(m)
    with pytest.raises(ValueError, match="unknown recipe"):
        fastpurify.ibau(m, (_X, _Y), recipe=bad, progress=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_reference_runs_the_published_algorithm_only():
    d = next(iter(recipes.ROBUST))
    with pytest.raises(ValueError, match="fast path only"):
        getattr(ref, d)(tiny_cnn(seed=0), (_X, _Y), recipe="robust", progress=False)
    r = ref.ibau(tiny_cnn(seed=0), (_X, _Y), recipe="published", epochs=1, progress=False, **_SMALL)
    assert r.info["recipe"] == "published"


def test_a_robust_recipe_a_defense_lacks_names_those_that_have_one():
    lacking = [d for d in fastpurify.DEFENSES if d not in recipes.ROBUST]
    if not lacking:
        pytest.skip("every defense has a robust recipe")
    with pytest.raises(ValueError, match="no measured recipe='robust'") as e:
        getattr(fastpurify, lacking[0])(tiny_cnn(seed=0), (_X, _Y), recipe="robust", progress=False)
    assert all(d in str(e.value) for d in recipes.ROBUST)


# --- fastpurify.purify -------------------------------------------------------------------------------------------

def test_default_plan_is_valid_and_uses_measured_recipes():
    from fastpurify.auto import _check_plan

    steps = _check_plan(PLAN)
    assert steps and all(s["recipe"] in recipes.available()[s["defense"]] for s in steps)


def test_purify_runs_its_plan_and_says_what_it_ran():
    m = tiny_cnn(seed=0)
    before = _weights(m)
    plan = [{"defense": "ibau", "recipe": "robust", "settings": dict(epochs=1, **_SMALL)},
            {"defense": "awm", "settings": dict(epochs=1, inner=1, **_SMALL)}]
    r = fastpurify.purify(m, (_X, _Y), plan=plan, progress=False)
    assert r.defense == "auto" and r.status == "completed"
    assert [(s["defense"], s["recipe"], s["status"]) for s in r.info["steps"]] == [
        ("ibau", "robust", "completed"), ("awm", "published", "completed")]
    assert r.info["steps"][0]["config"]["outer_portion"] == recipes.ROBUST["ibau"]["outer_portion"]
    assert [h["defense"] for h in r.history] == ["ibau", "awm"] and [h["step"] for h in r.history] == [0, 1]
    assert r.timings["defense"] == pytest.approx(r.timings["step0_ibau"] + r.timings["step1_awm"])
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the user's model: untouched
    assert any(not torch.equal(v, r.model.state_dict()[k]) for k, v in before.items() if v.is_floating_point())


def test_purify_is_reproducible_from_a_seed():
    plan = [{"defense": "ibau", "recipe": "robust", "settings": dict(epochs=1, shuffle=True, **_SMALL)}]
    a = fastpurify.purify(tiny_cnn(seed=0), (_X, _Y), plan=plan, seed=4, progress=False)
    b = fastpurify.purify(tiny_cnn(seed=0), (_X, _Y), plan=plan, seed=4, progress=False)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("plan,err,match", [
    ([], TypeError, "non-empty"),
    ("ibau", TypeError, "non-empty"),
    ([("nope", "published")], ValueError, "unknown defense"),
    ([("sau", "robustest")], ValueError, "unknown recipe"),
    ([("ibau", "robust", 0)], ValueError, "cost"),
    ([{"defense": "ibau", "settings": [1]}], TypeError, "settings"),
    ([{"defense": "ibau", "extra": 1}], TypeError, "plan step 0"),
])
def test_bad_plans_are_errors_before_any_work(plan, err, match):
    with pytest.raises(err, match=match):
        fastpurify.purify(tiny_cnn(seed=0), (_X, _Y), plan=plan, progress=False)


def test_purify_rejects_hyperparameters_unlabelled_data_and_bad_budgets():
    with pytest.raises(TypeError, match="hyper-parameters belong to one defense"):
        fastpurify.purify(tiny_cnn(seed=0), (_X, _Y), lr=0.1)
    with pytest.raises(ValueError, match="labelled clean images"):
        fastpurify.purify(tiny_cnn(seed=0), _X)
    for bad in (0, -1.0, float("nan"), True, "60"):
        with pytest.raises(ValueError, match="time_budget"):
            fastpurify.purify(tiny_cnn(seed=0), (_X, _Y), time_budget=bad)


def test_purify_splits_the_budget_by_cost_and_ends_within_it():
    clock = FakeClock()
    long = dict(epochs=1000, **_SMALL)
    plan = [{"defense": "ibau", "recipe": "robust", "cost": 3.0, "settings": long},
            {"defense": "sau", "cost": 1.0, "settings": long}]
    r = fastpurify.purify(Clocked(clock), (_X, _Y), time_budget=40.0, plan=plan, progress=False, clock=clock)
    assert clock.t <= 44.0, clock.t  # the loop's own 10 % tolerance (tests/test_time_budget.py)
    assert r.status == "budget_exhausted"
    s0, s1 = r.info["steps"]
    assert s0["status"] == s1["status"] == "budget_exhausted"
    # step 1 got 3/4 of the budget, step 2 what remained
    assert s0["seconds"] <= 0.75 * 40.0 * 1.1 and s1["seconds"] > 0


def test_purify_too_short_a_budget_is_a_clear_error():
    clock = FakeClock()
    with pytest.raises(fastpurify.TimeBudgetError, match="purify: .*give at least"):
        fastpurify.purify(Clocked(clock, fwd=1.0), (_X, _Y), time_budget=1.0, progress=False, clock=clock,
                          plan=[{"defense": "ibau", "settings": dict(epochs=1000, **_SMALL)}])


def test_purify_inplace_failure_in_a_later_step_gives_the_weights_back():
    m = tiny_cnn(seed=0)
    before = _weights(m)
    plan = [{"defense": "ibau", "settings": dict(epochs=1, **_SMALL)},
            {"defense": "awm", "settings": dict(epochs=1, inner=1, batch_size=32, trigger_lr=1e30, lr=1e30)}]
    with pytest.raises((fastpurify.DivergenceError, fastpurify.PurificationError)):
        fastpurify.purify(m, (_X, _Y), plan=plan, inplace=True, progress=False)
    for k, v in before.items():
        assert torch.equal(v, m.state_dict()[k]), k


# --- the command line: purify DEFENSE --recipe R, purify auto --------------------------------------------------

from test_cli import _err, main, no_work, workload  # noqa: E402,F401  (fixtures)


@pytest.mark.parametrize("extra,expected", [
    (["sau", "--recipe", "robust"], "no measured recipe='robust' for sau"),
    (["ibau", "--recipe", "robust", "--reference"], "exists on the fast path only"),
    (["ibau", "--recipe", "fastest"], "unknown recipe 'fastest'"),
    (["ibau", "--recipe", "robust", "--set", "outer_portion=2"], "outer_portion must be a fraction"),
    (["auto", "--epochs", "2"], "--epochs belong(s) to one defense"),
    (["auto", "--reference"], "--reference belong(s) to one defense"),
    (["auto", "--set", "lr=0.1"], "takes no --recipe or defense setting"),
    (["auto", "--recipe", "robust"], "takes no --recipe or defense setting"),
    (["autox"], "unknown defense 'autox'"),
])
def test_recipe_and_auto_options_are_checked_before_loading(capsys, workload, no_work, extra, expected):  # noqa: F811
    err = _err(capsys, ["purify", extra[0], *workload["base"], *extra[1:]])
    assert expected in err, err


def test_cli_recipe_runs_the_recipes_settings(capsys, workload):  # noqa: F811
    assert main(["purify", "ibau", *workload["base"], "--recipe", "robust", "--epochs", "1", "--clean-count", "100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["recipe"] == "robust" and out["rounds"] == 1
    assert out["config"]["outer_portion"] == recipes.ROBUST["ibau"]["outer_portion"]


def test_cli_auto_runs_the_plan_and_reports_its_steps(capsys, workload, monkeypatch):  # noqa: F811
    import fastpurify.auto

    # the default plan's steps, one round each (the command's own path: purify auto -> fastpurify.purify)
    monkeypatch.setattr(fastpurify.auto, "PLAN", tuple({"defense": d, "recipe": r, "cost": c,
                                                        "settings": {"epochs": 1}} for d, r, c in PLAN))
    assert main(["purify", "auto", *workload["base"], "--clean-count", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["defense"] == "auto" and out["status"] == "completed"
    assert [(s["defense"], s["recipe"]) for s in out["steps"]] == [(d, r) for d, r, _ in PLAN]
    assert out["recipe"] == "auto" and "verdict" in out


def test_list_options_names_the_recipes(capsys):
    from fastpurify.options import format_options

    text = format_options("ibau")
    assert "robust: " + ", ".join(f"{k}={v!r}" for k, v in recipes.ROBUST["ibau"].items()) in text
    assert "recipes" not in format_options("ibau", reference=True)
