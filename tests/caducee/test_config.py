"""Configuration: typed, validated, every problem reported at once with its key and file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from caducee import config


def test_sample_parses_to_the_defaults(tmp_path: Path) -> None:
    cfg = config.parse(tomllib.loads(config.sample("example.test")), tmp_path, tmp_path / "caducee.toml")
    assert cfg.server.domains == ("example.test",)
    assert cfg.listen.submission == config.HostPort("127.0.0.1", 5587)
    assert cfg.listen.imaps == config.HostPort("127.0.0.1", 1993)
    assert cfg.limits.max_message_size == 10 * 1024 * 1024
    assert cfg.database_url == f"sqlite:///{(tmp_path / 'caducee.db').resolve()}"


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "caducee.toml"
    path.write_text(
        '[server]\nhostnme = "x"\ndomains = []\n'
        '[listen]\nimap = "nowhere"\nsubmission = "127.0.0.1:99999"\n'
        '[limits]\nmax_message_size = "big"\n'
        '[logging]\nlevel = "info"\n'
        '[log]\nlevel = "loud"\n'
    )
    with pytest.raises(config.ConfigError) as caught:
        config.load(tmp_path)
    problems = caught.value.problems
    text = str(caught.value)
    assert len(problems) == 7
    for key in ("server.hostnme", "server.domains", "listen.imap", "listen.submission",
                "limits.max_message_size", "[logging]", "log.level"):
        assert key in text
    assert str(path) in text  # each line names the file


def test_empty_listener_disables_it(tmp_path: Path) -> None:
    cfg = config.parse({"listen": {"imap": ""}}, tmp_path, tmp_path / "c.toml")
    assert cfg.listen.imap is None


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "caducee.toml").write_text("[server\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(tmp_path)


def test_missing_file_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="caducee init"):
        config.load(tmp_path)


def test_inline_max_takes_0_to_1_mib(tmp_path: Path) -> None:
    assert config.parse({}, tmp_path, tmp_path / "c.toml").storage.inline_max == 64 * 1024
    assert config.parse({"storage": {"inline_max": 0}}, tmp_path, tmp_path / "c.toml").storage.inline_max == 0
    for bad in (-1, 1024 * 1024 + 1, "64k"):
        with pytest.raises(config.ConfigError, match="storage.inline_max"):
            config.parse({"storage": {"inline_max": bad}}, tmp_path, tmp_path / "c.toml")


def test_smtp_processes_takes_0_for_one_per_cpu_to_64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "c.toml"
    assert config.parse({}, tmp_path, source).smtp_process_count == 1
    assert config.parse({"server": {"smtp_processes": 3}}, tmp_path, source).smtp_process_count == 3
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5})
    assert config.parse({"server": {"smtp_processes": 0}}, tmp_path, source).smtp_process_count == 6
    for bad in (-1, 65, "auto", True):
        with pytest.raises(config.ConfigError, match="server.smtp_processes"):
            config.parse({"server": {"smtp_processes": bad}}, tmp_path, source)
