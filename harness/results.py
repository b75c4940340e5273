"""Result files: one result.json per run with versions and git state, written atomically."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

# 2: method.label and method.sort_key; repo-relative paths; 3: headline (harness.headline);
# 4: method.series and method.plan (the method's Plan: lazy layers, reading, pruning); 5: metrics (each
# task's declared metrics, harness.metrics; older results get them from harness.metrics.of_result)
SCHEMA_VERSION = 5
REPO_ROOT = Path(__file__).resolve().parent.parent


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "dirty": None if status is None else bool(status)}


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = None
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = name or platform.processor() or platform.machine()
    return {"type": device.type, "device": str(device), "name": name, "threads": torch.get_num_threads()}


def env_info() -> dict[str, Any]:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return info | git_state()


def config_key(data: Any) -> str:
    """A short stable key for settings: sha256 of their sorted JSON, 16 hex digits."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file beside ``path`` and rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SampleLog:
    """Per-sample predictions, appended and flushed as each finishes so that an interrupted run
    keeps them; a re-run with the same settings picks them up instead of generating again.
    ``finish`` renames the partial log to samples.jsonl once the run is complete."""

    def __init__(self, out_dir: Path, run_key: str) -> None:
        self.partial = out_dir / "samples.partial.jsonl"
        self.final = out_dir / "samples.jsonl"
        self.run_key = run_key

    def finished(self, variant: str) -> dict[str, dict]:
        """Rows of ``variant`` that an earlier, interrupted run with the same settings finished."""
        rows = {}
        if self.partial.exists():
            for line in self.partial.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the interruption
                if row.get("run_key") == self.run_key and row.get("variant") == variant:
                    rows[row["id"]] = {k: v for k, v in row.items() if k not in ("run_key", "variant")}
        return rows

    def count(self) -> int:
        """Rows in the partial log (any settings): what an interruption leaves behind."""
        return len(self.partial.read_text().splitlines()) if self.partial.exists() else 0

    def append(self, row: dict) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with self.partial.open("a") as f:
            f.write(json.dumps({"run_key": self.run_key, **row}) + "\n")
            f.flush()

    def finish(self, rows: list[dict]) -> None:
        tmp = self.final.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.final)
        self.partial.unlink(missing_ok=True)


def load(path: str | Path) -> dict:
    """A result.json, upgraded to ``SCHEMA_VERSION`` (in memory; the file is not touched), with its
    path as ``_path``. Every reader of result files goes through here, so an old file is upgraded in
    one place: what each version added is filled in from what the file does say."""
    path = Path(path)
    result = json.loads(path.read_text())
    result["_path"] = str(path)
    version = result.get("schema_version", 1)
    if version < 4 and "method" in result:
        method = result["method"]
        method.setdefault("series", _series_from_sort_key(method["name"], method.get("sort_key") or []))
    task = (result.get("config") or {}).get("task")
    if isinstance(task, dict):  # results from before carried caches re-encoded every turn
        task.setdefault("multiturn", "reencode")
    if version < 5 and isinstance(result.get("tasks"), dict):  # each task's metrics, as its task declares them
        result["metrics"] = {name: _declared(name, scores).to_json() for name, scores in result["tasks"].items()}
    eff = result.get("efficiency")
    if isinstance(eff, dict) and "noisy" not in eff:  # timed before the timing carried its noise verdict
        from harness.measure import timing_verdict

        eff["noisy"], eff["noise"] = timing_verdict(eff)
    result["schema_version_read"] = version
    return result


def _declared(name: str, scores: dict):
    """The metrics a task scored as ``name`` declares, for a result written before they were recorded:
    an lmms-eval benchmark's own (``harness.lmms.benchmarks.declared``), else ``harness.metrics.inferred``."""
    from harness import metrics
    from harness.lmms import benchmarks  # the declarations only: no lmms-eval needed

    if name in benchmarks.BENCHMARKS or name in benchmarks.COMBINED:
        return benchmarks.declared(name)
    return metrics.inferred(name, scores)


def _series_from_sort_key(name: str, order: list) -> str:
    """The figure series of a result written before results recorded it (schema < 4): decoded from
    its sort key, e.g. "lazy (calibrated)", "lazy qkv (uniform)", "lazy_fastv qkv"."""
    if order and order[0] == "variant":  # a non-default reading or rule: ["variant", share, scope, how, ...]
        reading = "".join(f" {x}" for x in order[1:3] if x not in ("qk", "all"))
        return f"{name}{reading} ({order[3]})"
    if order and isinstance(order[0], list) and order[0] and order[0][0] == "variant":  # composed
        return f"{name} " + " ".join(x for x in order[0][1:3] if x not in ("qk", "all"))
    if order and isinstance(order[0], str):  # a method's own family of settings, e.g. lazy (calibrated)
        return f"{name} ({order[0]})"
    return name


LOCK_NAME = "run.lock"


class RunLocked(Exception):
    """Another live process holds the out_dir's lock (its one-line reason is the message)."""


def lock_holder(out_dir: Path) -> dict | None:
    """What ``out_dir``'s lock says of its holder (host, pid, since), {} for an unreadable lock (one
    being written this instant, or damaged), None when there is no lock."""
    path = Path(out_dir) / LOCK_NAME
    try:
        return json.loads(path.read_text()) or {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def holder_alive(holder: dict) -> bool | None:
    """Whether a lock's holder still runs: on this host, whether its pid exists; on another host
    it cannot be told (None), and the lock is taken as live."""
    if holder.get("host") != platform.node() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def describe_holder(out_dir: Path, holder: dict) -> str:
    return (f"{out_dir} is in use by another run (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('since', '?')}; its lock {Path(out_dir) / LOCK_NAME})")


def check_unlocked(out_dir: Path) -> None:
    """A RunLocked of one line when a live run holds ``out_dir`` (one on another host counts as
    live). Read-only: the pre-Hydra check, so a second run leaves nothing in the first's folder."""
    holder = lock_holder(out_dir)
    if holder is not None and holder_alive(holder) is not False:
        raise RunLocked(f"{describe_holder(out_dir, holder)}; one writer per out_dir: wait for it, choose another "
                        "out_dir=DIR, or delete the lock if that run is gone.")


class RunLock:
    """One writer per out_dir: ``out_dir/run.lock``, made with O_EXCL and holding this process's host,
    pid and start time, removed when the run ends (finished, refused or interrupted). Without it a
    second run into the same folder (an overlapping requeued cluster job) would read the first's live
    rows as an interrupted run and both would write result.json. A lock whose holder is gone (a
    killed process on this host) is taken over, and ``took_over`` says whose it was."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.took_over: dict | None = None
        self.held = False

    def acquire(self) -> "RunLock":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        me = {"host": platform.node(), "pid": os.getpid(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock_holder(self.out_dir)
                if holder is None:
                    continue  # released between the two calls
                if holder_alive(holder) is not False:
                    check_unlocked(self.out_dir)  # raises RunLocked with the holder named
                    continue
                self.took_over = holder  # its process is gone: a killed run's lock
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLocked(f"{self.path} could not be taken (another run took it first); re-run.")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
