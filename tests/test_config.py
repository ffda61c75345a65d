"""The TOML configuration: every key documented, bad files refused with line and reason."""

from __future__ import annotations

import re

import pytest

from lastmile.cli import main as cli
from lastmile.config import Config, ConfigError, load_config, parse_config, render_defaults


def test_defaults_render_as_a_documented_file_that_parses_back_to_the_defaults() -> None:
    text = render_defaults()
    assert "[reading_center.tls]" in text and "# the PACS's AE title" in text
    assert parse_config(text).reading_center == Config().reading_center


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("[gateway]\nid = 1\n", 2, "'gateway.id' must be a string"),
        ("[gateway]\nid = 'x'\n\n[reading_center]\nport = 104\nprot = 2\n", 6, "unknown key 'reading_center.prot'"),
        ("[reading_center.tls]\nenabled = 'yes'\n", 2, "must be true or false"),
        ("[reading_center]\nno_commitment_policy = 'delete'\n", 2, "must be one of keep, purge"),
        ("[outbox]\nmin_free_mb = -5\n", 2, "must not be negative"),
        ("[nonsense]\nx = 1\n", None, "unknown key 'nonsense'"),
    ],
)
def test_bad_files_are_refused_with_line_and_reason(text: str, line: int | None, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "lastmile.toml")
    message = str(err.value)
    assert words in message
    if line is not None:
        assert message.startswith(f"lastmile.toml:{line}:")


def test_syntax_errors_name_the_file() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[gateway\n", "x.toml")


def test_missing_named_file_is_an_error_but_missing_default_gives_defaults(tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "nope.toml")
    monkeypatch.delenv("LASTMILE_CONFIG", raising=False)
    monkeypatch.setattr("lastmile.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load_config().source == "<defaults>"


def test_cli_reports_a_bad_file_with_exit_78(tmp_path, capsys) -> None:
    bad = tmp_path / "lastmile.toml"
    bad.write_text("[reading_center]\nport = 'x'\n")
    assert cli(["-c", str(bad), "config", "check"]) == 78
    assert "lastmile.toml:2" in capsys.readouterr().err
    good = tmp_path / "ok.toml"
    good.write_text("[reading_center]\nport = 4242\n")
    assert cli(["-c", str(good), "config", "check"]) == 0


def test_every_key_is_documented_in_the_defaults() -> None:
    """`lastmile config defaults` is the documentation: every key carries its meaning, even where
    the formatter wrapped a long comment into the default's parentheses."""
    import re

    from lastmile.config import render_defaults

    undocumented = [
        line for line in render_defaults().splitlines() if re.match(r"^\w+ = ", line) and "  # " not in line
    ]
    assert undocumented == []


def test_a_file_saved_by_windows_notepad_is_read_and_a_gbk_one_refused_with_its_line(tmp_path) -> None:
    """lastmile/config.py load_config: the clinic writes lastmile.toml on the SD card's boot
    partition (image/files/README-clinic.txt), often with Windows Notepad, which starts a UTF-8
    file with a byte-order mark (always before Windows 10 1903; "UTF-8 with BOM" since). Every
    service refused that file - "not valid TOML: Invalid statement (at line 1, column 1)" - for a
    first line that looks right, and the whole gateway stopped (exit 78). Saved as "ANSI" (GBK on
    a Chinese Windows) with the clinic's name in it, the refusal was a Python codec message
    with a byte offset: it now names the line and how to save the file."""
    path = tmp_path / "lastmile.toml"
    clinic = "城关镇卫生院"
    path.write_bytes(b"\xef\xbb\xbf[gateway]\r\ninstitution = '" + clinic.encode() + b"'\r\n")
    assert load_config(path).gateway.institution == clinic
    path.write_bytes(b"\xef\xbb\xbf[gateway]\r\nid = ''\r\n")  # mistakes keep their line numbers
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}:2: 'gateway.id' must not be empty"):
        load_config(path)
    path.write_bytes(b"[gateway]\r\nid = 'cg-01'\r\ninstitution = '" + clinic.encode("gbk") + b"'\r\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:3: ") and "UTF-8" in str(err.value), err.value
