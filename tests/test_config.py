"""--config FILE: a pair run from TOML files, the command line overriding them."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest
from cluster import KV, Cluster, KvClient, Process, status, wait_until
from support import FTPROXY, ROOT, free_port

from ftproxy import config
from ftproxy.cli import build_parser, split_guest_argv

CONTRIB = ROOT / "contrib"


def test_a_pair_runs_from_a_config_file_and_flags_override_it(tmp_path: Path) -> None:
    arbiter, log, service = free_port(), free_port(), free_port()
    primary_admin, backup_admin = free_port(), free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        file = tmp_path / "ftproxy.toml"
        file.write_text(
            f"""
[arbiter]
listen = "127.0.0.1:{arbiter}"
data-dir = "{tmp_path / "arbiter"}"
insecure = true

[primary]
log-listen = "127.0.0.1:{log}"
arbiter = "127.0.0.1:{arbiter}"
admin = "127.0.0.1:{busy.getsockname()[1]}"   # overridden below: busy, it would fail
insecure = true
heartbeat-ms = 50
pair = "from-the-file"
program = ["{KV}", "--port", "{service}"]

[backup]
primary = "127.0.0.1:{log}"
arbiter = "127.0.0.1:{arbiter}"
admin = "127.0.0.1:{backup_admin}"
insecure = true
program = ["{KV}", "--port", "{service}"]
"""
        )
        started = [
            Process("arbiter", [*FTPROXY, "--config", str(file), "arbiter"], tmp_path),
            Process(
                "primary",
                [
                    *FTPROXY,
                    "primary",
                    "--config",
                    str(file),
                    "--admin",
                    f"127.0.0.1:{primary_admin}",
                ],
                tmp_path,
            ),
            Process("backup", [*FTPROXY, "--config", str(file), "backup"], tmp_path),
        ]
        try:
            started[1].wait_for_output("listening")
            assert KvClient(service).call("INCR", "n") == 1
            primary = status(primary_admin)
            assert primary["role"] == "primary" and primary["pair"] == "from-the-file"
            wait_until(lambda: status(backup_admin)["role"] == "backup", 20, "backup replays")
        finally:
            for process in started:
                process.stop()


def test_ftproxy_run_and_its_data_dir_come_from_a_config_file(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    c.start_arbiter()
    log, admin = free_port(), free_port()
    data = tmp_path / "node-data"
    file = tmp_path / "node.toml"
    file.write_text(
        f"""
[run]
pair = "kv-from-file"
log-listen = "127.0.0.1:{log}"
arbiter = "127.0.0.1:{c.arbiter_port}"
admin = "127.0.0.1:{admin}"
data-dir = "{data}"
insecure = true
program = ["{KV}", "--port", "{c.service_port}"]
"""
    )
    node = Process("node", [*FTPROXY, "--config", str(file), "run"], tmp_path)
    try:
        node.wait_for_output("listening")
        assert KvClient(c.service_port).call("INCR", "n") == 1
        now = status(admin)
        assert now["role"] == "live" and now["pair"] == "kv-from-file"
        assert now["generation"] == 0 and now["protected"] is False
        assert now["log_store"]["path"] == str(data / "log.ftlog")
        assert (data / "pair").read_text() == "kv-from-file\n"
    finally:
        node.stop()
        c.stop()


def test_the_command_line_program_replaces_the_files(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[record]\nlog = "x.ftlog"\nprogram = ["a.py"]\nenv = ["A=1", "B=2"]\n')
    own, guest = split_guest_argv(["record", "--config", str(file), "--env", "C=3", "--", "b.py"])
    own, guest = config.apply(build_parser(), config.load(str(file)), own, guest, str(file))
    args = build_parser().parse_args(own)
    assert guest == ["b.py"]
    assert args.log == "x.ftlog"
    assert args.env == ["C=3"]  # a repeatable flag on the command line replaces the list


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[primary]\nlog-listn = '127.0.0.1:1'\n", "[primary] log-listn: unknown key"),
        ("[primary]\nheartbeat-ms = 'fast'\n", "[primary] heartbeat-ms: expected a number"),
        ("[primary]\nmax-lag-bytes = 1.5\n", "[primary] max-lag-bytes: expected an integer"),
        ("[primary]\ninsecure = 'yes'\n", "[primary] insecure: expected true or false"),
        ("[primary]\nadmin = 7201\n", "[primary] admin: expected a string"),
        ("[primary]\nprogram = 'kv.py'\n", "[primary] program: expected a list of strings"),
        ("[primry]\n", "[primry] is not an ftproxy command"),
        ("verbose = 1\n", "verbose: expected true or false"),
        ("not toml = = 1\n", "not TOML"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    done = subprocess.run(
        [*FTPROXY, "--config", str(file), "primary", "--", str(KV)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"ftproxy: --config {file}: "), done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("path", sorted(CONTRIB.glob("*.toml")), ids=lambda p: p.name)
def test_the_contrib_examples_are_valid(path: Path) -> None:
    parsed = config.load(str(path))
    commands = [name for name, value in parsed.items() if isinstance(value, dict)]
    assert commands
    for command in commands:
        own, guest = config.apply(build_parser(), parsed, [command], [], str(path))
        args = build_parser().parse_args(own)
        assert args.command == command
        if command in config.WITH_PROGRAM:
            assert guest, f"{path.name} [{command}] names no program"


def test_config_is_accepted_before_and_after_the_subcommand() -> None:
    assert config.config_path(["--config", "a.toml", "primary"]) == "a.toml"
    assert config.config_path(["primary", "--config=b.toml"]) == "b.toml"
    assert config.config_path(["primary"]) is None


def test_sigterm_of_the_primary_stops_the_service_on_both_hosts(tmp_path: Path) -> None:
    """What contrib/systemd's units rely on: systemctl stop on the primary stops the pair."""
    cluster = Cluster(tmp_path).start()
    try:
        assert KvClient(cluster.service_port).call("INCR", "n") == 1
        cluster.primary.signal(signal.SIGTERM)
        assert cluster.primary.wait() == 0
        assert cluster.backup.wait() == 0  # its guest replayed the signal and ended too
        assert not any(e["event"] == "role_changed" for e in cluster.backup.events())
    finally:
        cluster.stop()
