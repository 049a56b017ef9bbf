"""The `drywallqa` command: help, plugin registration guard, no heavy imports at start-up."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from drywallqa import cli


def test_help_lists_commands_and_runs_as_console_script():
    out = subprocess.run([sys.executable, "-m", "drywallqa.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("data", "predict", "eval"):
        assert command in out
    assert "drywallqa predict --prompt" in out  # examples in the epilog


@pytest.mark.parametrize("argv", [["data", "prepare", "--help"], ["data", "split", "--help"],
                                  ["predict", "--help"], ["eval", "--help"]])
def test_subcommand_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert "usage: drywallqa" in capsys.readouterr().out


def test_dashboard_help_shows_real_defaults_only(capsys, monkeypatch):
    """Every option has help; defaults worked out at run time are named in the help text, not '(default: None)'."""
    monkeypatch.setenv("COLUMNS", "200")  # one option a line
    with pytest.raises(SystemExit):
        cli.main(["dashboard", "--help"])
    text = capsys.readouterr().out
    out = " ".join(text.split())
    for noise in ("(default: None)", "(default: [])", "(default: False)", "(default: )"):
        assert noise not in out
    assert "--mqtt-host MQTT_HOST the MQTT broker" in out and "(default: 127.0.0.1)" in out
    assert "[drywallqa-dashboard-<host name>]" in out and "(default: 8080)" in out
    import argparse

    from drywallqa.dashboard.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["dashboard"]
    bare = [a.option_strings[-1] for a in sub._actions if a.option_strings and not a.help]
    assert len(sub._actions) > 15 and not bare, f"options without help: {bare}"
    assert "--session-hours" in text


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["data"])
    assert exc.value.code == 2
    assert "prepare" in capsys.readouterr().err


def test_startup_imports_no_heavy_modules():
    code = textwrap.dedent("""
        import sys
        from drywallqa.cli import build_parser
        build_parser()
        heavy = [m for m in ("torch", "transformers", "openvino", "onnxruntime") if m in sys.modules]
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`drywallqa --help` imports {out}; import them inside the handlers"


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "dqa_hello_cli.py").write_text(textwrap.dedent("""
        def register(subparsers):
            p = subparsers.add_parser("hello", help="say hello")
            p.add_argument("--name", default="wall")
            p.set_defaults(handler=lambda args: print(f"hello {args.name}") or 0)
    """))
    (tmp_path / "dqa_broken_cli.py").write_text("import dqa_dependency_that_is_not_installed\n")
    yield tmp_path
    for name in ("dqa_hello_cli", "dqa_broken_cli"):
        sys.modules.pop(name, None)


def test_plugins_register_and_missing_ones_are_skipped(plugin_dir, monkeypatch, capsys):
    monkeypatch.setattr(cli, "PLUGIN_MODULES", ("dqa_not_written_yet.cli", "dqa_hello_cli"))
    assert cli.main(["hello", "--name", "seam"]) == 0
    assert "hello seam" in capsys.readouterr().out


def test_import_error_inside_an_existing_plugin_is_not_hidden(plugin_dir, monkeypatch):
    monkeypatch.setattr(cli, "PLUGIN_MODULES", ("dqa_broken_cli",))
    with pytest.raises(ModuleNotFoundError, match="dqa_dependency_that_is_not_installed"):
        cli.build_parser()
