"""Issue 34: a workflow that cannot mislead. One writer per out_dir (a lock naming its holder, a
stale one taken over), degenerate settings refused before the model loads, noisy timings flagged,
one-line errors that leave nothing behind. Everything in this process (``harness_cli``)."""

import json
import platform
import subprocess

import pytest
from helpers import harness_cli

from harness.results import LOCK_NAME, RunLock, RunLocked

QUICK = ["model=llava_tiny_random", "limit=2", "batch_size=2", "efficiency.enabled=false", "compare_dense=false"]


def write_lock(out_dir, **holder):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LOCK_NAME).write_text(json.dumps({"since": "2026-01-01T00:00:00+00:00", **holder}))


def test_a_second_writer_is_refused_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, capfd):
    out = tmp_path / "r"
    holder = subprocess.Popen(["sleep", "60"])  # a live process on this host holds the lock
    try:
        write_lock(out, host=platform.node(), pid=holder.pid)
        status, stdout, err = harness_cli([*QUICK, f"out_dir={out}"], monkeypatch, capfd, cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert status == 2, err
    assert err.strip().count("\n") == 0 and err.startswith("error: ")
    assert f"pid {holder.pid}" in err and platform.node() in err and "one writer per out_dir" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no .hydra/, no log, the lock untouched

    write_lock(out, host="some-other-node", pid=1)  # another host: liveness unknown, so live
    status, _, err = harness_cli([*QUICK, f"out_dir={out}"], monkeypatch, capfd, cwd=tmp_path)
    assert status == 2 and "host some-other-node" in err


def test_a_stale_lock_is_taken_over_and_said(tmp_path, monkeypatch, capfd):
    out = tmp_path / "r"
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process: a killed run's lock
    write_lock(out, host=platform.node(), pid=gone.pid)
    status, _, err = harness_cli([*QUICK, f"out_dir={out}"], monkeypatch, capfd, cwd=tmp_path)
    assert status == 0, err[-2000:]
    assert f"took over a stale lock in {out} (host {platform.node()}, pid {gone.pid}" in err
    assert (out / "result.json").exists() and not (out / LOCK_NAME).exists()  # released at the end


def test_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path) as first:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] > 0
        with pytest.raises(RunLocked, match="in use by another run"):
            RunLock(tmp_path).acquire()
        assert first.held
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        pass
