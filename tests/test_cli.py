"""The ``meshlink`` command: help, exit codes, resolve --explain, ls, call, connect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlink.cli import main

NAME = "echo-svc"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("MESHLINK_"):
            monkeypatch.delenv(var)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHLINK_")}


@pytest.fixture
def server(store: Path) -> Iterator[str]:
    """``meshlink serve-echo --tcp`` in its own process; yields its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlink.cli", "serve-echo", NAME, "--host-store", str(store),
         "--tcp"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    try:
        assert line.startswith(f"serving {NAME}: vchan://host-store/{NAME} tcp://127.0.0.1:"), (
            line, proc.stderr.read() if proc.poll() is not None else "")
        yield line
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("argv", [["--help"], ["--help", "--version"]])
def test_help_lists_commands(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("serve-echo", "resolve", "ls", "connect", "call", "disk"):
        assert cmd in out


def test_version_prints_without_loading_trio() -> None:
    # A fresh interpreter: this one has trio loaded already.
    code = ("import sys\n"
            "from meshlink.cli import main\n"
            "try:\n"
            "    main(['--version'])\n"
            "except SystemExit as exc:\n"
            "    print('exit', exc.code, 'trio' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert out[0].startswith("meshlink ")
    assert out[-1] == "exit 0 False"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["resolve"], ["frobnicate"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_unknown_name_exits_1_with_message(store: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["call", "nobody", "echo", "x", "--host-store", str(store)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no usable endpoint for 'nobody'")


def test_bad_rules_file_names_file_and_line(store: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[names]\n"x" = ["udp://10.0.0.1:5"]\n')
    assert main(["resolve", "x", "--host-store", str(store), "--rules", str(rules)]) == 1
    assert f"{rules}:2:" in capsys.readouterr().err


def test_resolve_explain_with_rules(store: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rewrite]]\nsuffix = ".rack1"\n'
                     'endpoints = ["tcp://{host}.example:7002", "tls://{host}.example:7001"]\n')
    argv = ["resolve", "db.rack1", "--explain", "--host-store", str(store),
            "--rules", str(rules), "--tls-ca", str(rules)]  # any CA path makes TLS usable
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "1. tls://db.example:7001" and "from rules" in out[1]
    assert out[2] == "2. tcp://db.example:7002"
    assert main([*argv, "--require-tls"]) == 0
    out = capsys.readouterr().out
    assert "-  tcp://db.example:7002 rejected" in out and "policy requires TLS" in out


def test_call_connect_ls_against_a_server(server: str, store: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["call", NAME, "echo", "hello from dom0", "--host-store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out) == "HELLO FROM DOM0"
    # a method that does not exist: the remote error, exit 1
    assert main(["call", NAME, "nope", "--host-store", str(store)]) == 1
    assert "error:" in capsys.readouterr().err
    assert main(["ls", "--host-store", str(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "SOURCE", "TRANSPORTS", "ENDPOINTS"]
    assert out[1].split()[:3] == [NAME, "hoststore", "vchan,tcp"]
    out = subprocess.run(
        [sys.executable, "-m", "meshlink.cli", "connect", NAME, "--host-store", str(store)],
        input="one\ntwo words\n", capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["ONE", "TWO WORDS"]
    assert f"connected to {NAME} over vchan" in out.stderr


def test_ls_shows_stale_entries(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlink.cli", "serve-echo", NAME, "--host-store", str(store)],
        stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("serving")
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert main(["ls", "--host-store", str(store)]) == 0
    assert "(stale: server gone)" in capsys.readouterr().out


def test_serve_echo_name_in_use_exits_1(server: str, store: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshlink.cli", "serve-echo", NAME, "--host-store", str(store)],
        capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 1
    assert "already served" in out.stderr
