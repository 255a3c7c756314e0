"""The option tables: precedence, parsing, `--help` and the generated configuration docs."""

from __future__ import annotations

import argparse

import pytest

from dht_bridge.errors import ConfigError
from dht_bridge.options import Option, OptionTable
from rma.cli import build_parser, main
from rma.reference import DOC, TABLES, rewrite

TABLE = OptionTable(
    Option("port", "TEST_PORT", "a port", "int", 8080),
    Option("peers", "TEST_PEERS", "peers", "peers", (("a", 1),)),
    Option("names", "TEST_NAMES", "names", "list", ()),
    Option("flag", "TEST_FLAG", "a switch", "bool", False),
    Option("wait", "TEST_WAIT", "seconds", "float", 1.5),
    Option("only_flag", None, "no variable", default="x"),
)


def resolve(argv: list[str], environ: dict[str, str]) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    TABLE.add_to(parser)
    return TABLE.resolve(parser.parse_args(argv), environ)


def test_a_flag_beats_its_variable_which_beats_the_default() -> None:
    assert resolve([], {})["port"] == 8080
    assert resolve([], {"RMA_TEST_PORT": "9000"})["port"] == 9000
    assert resolve(["--port", "9100"], {"RMA_TEST_PORT": "9000"})["port"] == 9100
    # An empty variable is unset; a given list replaces the variable's, never adds to it.
    assert resolve([], {"RMA_TEST_PORT": ""})["port"] == 8080
    values = resolve(["--names", "c", "--names", "d,e"], {"RMA_TEST_NAMES": "a,b"})
    assert values["names"] == ("c", "d", "e")
    assert resolve([], {"RMA_TEST_PEERS": "h:1, [::1]:2"})["peers"] == (("h", 1), ("::1", 2))
    assert resolve(["--no-flag"], {"RMA_TEST_FLAG": "yes"})["flag"] is False
    assert resolve([], {"RMA_TEST_FLAG": "on"})["flag"] is True
    assert resolve([], {"RMA_ONLY_FLAG": "y"})["only_flag"] == "x"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"RMA_TEST_PORT": "many"}, "RMA_TEST_PORT"),
        ({"RMA_TEST_FLAG": "perhaps"}, "RMA_TEST_FLAG"),
        ({"RMA_TEST_PEERS": "nohost"}, "RMA_TEST_PEERS"),
        ({"RMA_TEST_WAIT": "nan"}, "RMA_TEST_WAIT='nan': is not a number: it must be finite"),
        ({"RMA_TEST_WAIT": "inf"}, "RMA_TEST_WAIT"),
    ],
)
def test_a_bad_variable_is_a_config_error_naming_it(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        resolve([], environ)


def test_a_bad_flag_value_is_a_config_error_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match="--peers"):
        resolve(["--peers", "nohost"], {})


@pytest.mark.parametrize("value", ["nan", "inf", "1e999"])
def test_a_float_flag_must_be_finite(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        resolve(["--wait", value], {})
    refused = capsys.readouterr().err
    assert f"argument --wait: {value!r} is not a number: it must be finite" in refused
    assert resolve(["--wait", "2.5"], {})["wait"] == 2.5


def test_an_option_declared_twice_in_one_table_is_refused() -> None:
    with pytest.raises(ValueError, match="port"):
        OptionTable(TABLE, Option("port", "OTHER", "again"))


@pytest.mark.parametrize("command", sorted(set(TABLES) - {"rma"}))
def test_every_subcommand_help_shows_each_option_with_its_variable_and_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    # argparse wraps help lines (at spaces and hyphens): compare without whitespace.
    out = "".join(capsys.readouterr().out.split())
    for option in TABLES[command]:
        assert option.option_string in out
        if option.variable:
            assert option.variable in out
        assert "".join(f"default: {option.default_text()}".split()) in out


def test_the_top_level_help_shows_the_log_level_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "RMA_LOG_LEVEL" in capsys.readouterr().out


def test_the_configuration_docs_are_generated_from_the_option_tables() -> None:
    text = DOC.read_text("utf-8")
    assert rewrite(text) == text, "docs/configuration.md is stale: run python -m rma.reference"
