"""``--list-options``: every defense's settings listed with their defaults and a description read from the source."""

import dataclasses

import pytest

from fastpurify.cli import main
from fastpurify.defenses import DEFENSES
from fastpurify.options import defense_options, format_options


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("name", DEFENSES)
def test_every_setting_has_a_default_and_a_description(name, reference):
    rows = defense_options(name, reference)
    assert rows and all(r["help"] for r in rows), [r["name"] for r in rows if not r["help"]]
    # the defaults are the configuration class's own
    from fastpurify.cli_purify import defense_config

    cfg = defense_config(name, reference, None, {}, "test")
    assert {r["name"]: r["default"] for r in rows} == {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    assert any(r["fast_only"] for r in rows) == (not reference)  # every fast path adds an execution option


def test_a_comment_above_a_field_is_its_description():
    row = next(r for r in defense_options("ibau") if r["name"] == "cuda_graph")
    assert row["help"].startswith("CUDA graphs of the hypergradient step") and row["fast_only"]


def test_cli_lists_one_defense_and_exits_without_the_required_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["purify", "awm", "--list-options"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("awm settings (fast path") and "trigger_norm" in out and "1000.0" in out
    assert "sau settings" not in out
    with pytest.raises(SystemExit):
        main(["purify", "--list-options"])  # no defense: all five
    out = capsys.readouterr().out
    assert all(f"{d} settings" in out for d in DEFENSES)


def test_cli_lists_the_reference_settings_after_reference(capsys):
    with pytest.raises(SystemExit):
        main(["purify", "sau", "--reference", "--list-options"])
    out = capsys.readouterr().out
    assert out.startswith("sau settings (reference") and "precision" not in out


def test_an_unknown_defense_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["purify", "fooo", "--list-options"])
    assert e.value.code == 2 and "unknown defense 'fooo'" in capsys.readouterr().err


def test_format_names_how_to_give_a_setting():
    text = format_options("bcu")
    assert "--set KEY=VALUE" in text and "fastpurify.bcu(..., KEY=VALUE)" in text and "time_budget" in text


def test_every_command_line_option_has_help_text():
    from fastpurify.cli import build_parser

    parser = build_parser()
    missing = [(name, a.option_strings or a.dest) for name, sub in parser._subparsers._group_actions[0].choices.items()
               for a in sub._actions if not a.help and "-h" not in a.option_strings]
    assert not missing, missing


def test_demo_and_bench_take_defenses_the_same_way():
    from fastpurify.cli import build_parser

    parser = build_parser()
    for cmd in (["demo"], ["bench"]):
        spaced = parser.parse_args([*cmd, "--defenses", "sau", "bcu"]).defenses
        commas = parser.parse_args([*cmd, "--defenses", "sau,bcu"]).defenses
        from fastpurify.cli import _split_names

        assert _split_names(spaced) == _split_names(commas) == ["sau", "bcu"], cmd
