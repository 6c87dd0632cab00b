"""The arbiter's durable store: test-and-set, reopening, torn tails, corruption, locking."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from structlog.testing import capture_logs

from arbiter._store import FILE_NAME, MAGIC, Store, StoreCorruptError, StoreError

HEADER_SIZE = len(MAGIC) + 2


def record(key: str, winner: str, decided_ns: int = 0) -> bytes:
    """One record as the store writes it."""
    body = msgspec.msgpack.encode([key, winner, decided_ns])
    return len(body).to_bytes(4, "little") + zlib.crc32(body).to_bytes(4, "little") + body


def test_test_and_set_semantics(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        assert store.get("gen-1") is None
        assert store.decide("gen-1", "backup") == ("backup", True)
        assert store.decide("gen-1", "backup") == ("backup", True)  # idempotent for the winner
        assert store.decide("gen-1", "primary") == ("backup", False)  # loser told who won
        assert store.get("gen-1") == "backup"
        assert store.decide("gen-2", "primary") == ("primary", True)  # keys are independent


def test_decisions_survive_reopening(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.decide("gen-1", "backup")
        store.decide("gen-2", "primary")
    with Store.open(tmp_path) as store:
        assert store.items() == [("gen-1", "backup"), ("gen-2", "primary")]
        assert store.decide("gen-1", "primary") == ("backup", False)


def test_repeats_write_nothing(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.decide("gen-1", "backup")
        size = (tmp_path / FILE_NAME).stat().st_size
        store.decide("gen-1", "backup")
        store.decide("gen-1", "primary")
        assert (tmp_path / FILE_NAME).stat().st_size == size


def test_missing_data_dir_is_created(tmp_path: Path) -> None:
    with Store.open(tmp_path / "a" / "b") as store:
        store.decide("k", "w")
    assert (tmp_path / "a" / "b" / FILE_NAME).is_file()


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot open"):
        Store.open(tmp_path / "file")


def test_one_arbiter_per_directory(tmp_path: Path) -> None:
    with Store.open(tmp_path), pytest.raises(StoreError, match="another arbiter"):
        Store.open(tmp_path)
    Store.open(tmp_path).close()  # the lock goes with the first store


# --- Crashes -------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 8, 9, -1])
def test_torn_last_record_is_dropped(tmp_path: Path, cut: int) -> None:
    with Store.open(tmp_path) as store:
        store.decide("gen-1", "backup")
    path = tmp_path / FILE_NAME
    good_size = path.stat().st_size
    with path.open("ab") as file:
        file.write(record("gen-2", "primary")[:cut])
    with capture_logs() as logs, Store.open(tmp_path) as store:
        assert store.items() == [("gen-1", "backup")]
        assert path.stat().st_size == good_size
        assert store.decide("gen-2", "intruder") == ("intruder", True)
    assert [entry["event"] for entry in logs] == ["store_tail_dropped"]
    with Store.open(tmp_path) as store:
        assert store.items() == [("gen-1", "backup"), ("gen-2", "intruder")]


@pytest.mark.parametrize("size", [0, 3, HEADER_SIZE - 1])
def test_torn_header_is_rewritten(tmp_path: Path, size: int) -> None:
    path = tmp_path / FILE_NAME
    with Store.open(tmp_path):
        pass
    path.write_bytes(path.read_bytes()[:size])
    with Store.open(tmp_path) as store:
        assert len(store) == 0
        store.decide("k", "w")
    with Store.open(tmp_path) as store:
        assert store.get("k") == "w"


def test_failed_write_stops_new_decisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(tmp_path) as store:
        store.decide("gen-1", "backup")

        def broken_fsync(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", broken_fsync)
        with pytest.raises(StoreError, match="cannot record a decision"):
            store.decide("gen-2", "primary")
        monkeypatch.undo()
        # What reached the disk is unknown: no new decision until reopened...
        with pytest.raises(StoreError, match="failed earlier"):
            store.decide("gen-3", "primary")
        # ... but the decisions known to be durable are still answered.
        assert store.decide("gen-1", "primary") == ("backup", False)
        assert store.get("gen-2") is None


# --- Corruption ----------------------------------------------------------------------


def corrupt_store(tmp_path: Path, content: bytes) -> None:
    (tmp_path / FILE_NAME).write_bytes(content)


def valid_header(tmp_path: Path) -> bytes:
    with Store.open(tmp_path / "scratch"):
        pass
    return (tmp_path / "scratch" / FILE_NAME).read_bytes()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"hello, world\n", "not an arbiter store"),
        (b"FTARBITE!", "not an arbiter store"),
        (MAGIC + (99).to_bytes(2, "little"), "format version 99"),
    ],
)
def test_not_a_store(tmp_path: Path, content: bytes, match: str) -> None:
    corrupt_store(tmp_path, content)
    with pytest.raises(StoreCorruptError, match=match):
        Store.open(tmp_path)


def test_flipped_byte_fails_the_checksum(tmp_path: Path) -> None:
    good = record("gen-1", "backup")
    bad = good[:-1] + bytes([good[-1] ^ 0x01])
    corrupt_store(tmp_path, valid_header(tmp_path) + bad + record("gen-2", "primary"))
    with pytest.raises(StoreCorruptError, match=f"record at byte {HEADER_SIZE} fails its checksum"):
        Store.open(tmp_path)


def test_huge_length_is_corruption(tmp_path: Path) -> None:
    corrupt_store(tmp_path, valid_header(tmp_path) + b"\xff\xff\xff\xff" + b"\0" * 20)
    with pytest.raises(StoreCorruptError, match="claims"):
        Store.open(tmp_path)


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\xa1\x80\xa1a\x00"], ids=["msgpack", "utf8"])
def test_undecodable_record_is_corruption(tmp_path: Path, body: bytes) -> None:
    raw = len(body).to_bytes(4, "little") + zlib.crc32(body).to_bytes(4, "little") + body
    corrupt_store(tmp_path, valid_header(tmp_path) + raw)
    with pytest.raises(StoreCorruptError, match="does not decode"):
        Store.open(tmp_path)


def test_key_decided_twice_is_corruption(tmp_path: Path) -> None:
    header = valid_header(tmp_path)
    corrupt_store(tmp_path, header + record("gen-1", "backup") + record("gen-1", "primary"))
    with pytest.raises(StoreCorruptError, match="decided twice"):
        Store.open(tmp_path)


def test_corrupt_store_keeps_its_file(tmp_path: Path) -> None:
    content = valid_header(tmp_path) + b"\xff" * 8
    corrupt_store(tmp_path, content)
    with pytest.raises(StoreCorruptError):
        Store.open(tmp_path)
    assert (tmp_path / FILE_NAME).read_bytes() == content  # left for the operator


# --- Against a model -----------------------------------------------------------------


class StoreMachine(RuleBasedStateMachine):
    """Random decisions, reopenings and torn appends, checked against a plain dict."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="arbiter-store-"))
        self.store = Store.open(self.directory)
        self.model: dict[str, str] = {}

    keys = st.sampled_from(["gen-1", "gen-2", "gen-3"])
    candidates = st.sampled_from(["primary", "backup"])

    @rule(key=keys, candidate=candidates)
    def decide(self, key: str, candidate: str) -> None:
        winner = self.model.setdefault(key, candidate)
        assert self.store.decide(key, candidate) == (winner, winner == candidate)

    @rule(key=keys)
    def get(self, key: str) -> None:
        assert self.store.get(key) == self.model.get(key)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store.open(self.directory)

    @rule(key=keys, candidate=candidates, cut=st.integers(1, 12))
    def crash_during_append(self, key: str, candidate: str, cut: int) -> None:
        self.store.close()
        with (self.directory / FILE_NAME).open("ab") as file:
            file.write(record(key, candidate)[:cut])
        with capture_logs():
            self.store = Store.open(self.directory)

    @invariant()
    def matches_the_model(self) -> None:
        assert dict(self.store.items()) == self.model

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory)


# Each new decision is an fsync (~10 ms on a plain disk): keep the run short.
StoreMachine.TestCase.settings = settings(max_examples=15, stateful_step_count=12, deadline=None)
TestStoreMachine = StoreMachine.TestCase
