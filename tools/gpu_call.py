"""The one device command (docs/gpu.md): ``python3 tools/gpu_call.py --out DIR --deadline 500 --resume results/gpu``.

Standard library only, so it runs on the device image's bare ``python3`` (no venv, no network)
and writes its summary even when nothing else can be imported. It

1. installs the carried wheels (``.whl/*.whl``, ``make gpu-wheels``) into a target folder with
   ``pip install --no-index --no-deps --target`` (unzipping them if pip fails) and puts it, and the
   repository, first on ``PYTHONPATH``;
2. copies the partial results of an earlier call into ``DIR`` when ``--resume`` names them (a
   results folder, or ``results/gpu`` holding one per device), so finished steps and points are
   skipped;
3. runs ``STEPS`` in order, each ``python -m harness.gpu_plan PHASE`` in its own process group
   with its own timeout: what is left before the deadline, less the time reserved for the later
   first-tier steps; a step that hangs or dies (a CUDA device-side assert, say) is killed or
   recorded and the next one runs;
4. rewrites ``DIR/summary.json`` and ``DIR/README.md`` after every step, and keeps ``DIR`` within
   what comes back from the device (``LIMITS``: at most 8 files, 16 MiB each, at most two folders
   down; anything else is moved out and named in the summary).

Exit status 0 when no step failed (steps skipped for want of CUDA, cut by the deadline or not run
are not failures), 1 otherwise; the summary is written either way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("env", "throughput", "correctness", "pruning", "budget")
# (step, phase, tier, reserve): steps by value; ``reserve`` is the share of the deadline held back
# for that step while the earlier ones run (tier-2 steps reserve nothing: they take what is left)
STEPS = [
    ("env", "env", 1, 0.04),
    ("throughput", "throughput", 1, 0.42),
    ("correctness", "correctness", 1, 0.16),
    ("pruning", "pruning", 1, 0.23),
    ("budget", "budget", 1, 0.0),
    ("throughput-2", "throughput", 2, 0.0),
    ("pruning-2", "pruning", 2, 0.0),
    ("budget-2", "budget", 2, 0.0),
]
FILES = ("README.md", "summary.json", "log.txt", *(f"{p}.json" for p in PHASES))
LIMITS = {"files": 8, "file_bytes": 16 * 2**20, "depth": 2}
LOG_CAP = 4 * 2**20  # log.txt keeps its first and last 2 MiB
MIN_STEP_S = 1.0  # a step with less than this is not started


def summary_reserve(deadline: float) -> float:
    """Seconds kept back for the last summary (it takes milliseconds; 5 s on the device)."""
    return min(5.0, max(0.3, 0.02 * deadline))
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_slug() -> str:
    """The first GPU's name as ``harness.gpu_check.cli.device_slug`` writes it, or ``cpu``."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        name = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        name = ""
    return slugify(name) if name else "cpu"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def git_sha() -> str:
    """The tree's commit: git's where it can say (a checkout), else ``.whl/GIT_SHA`` (the device's
    copy of the tree has no ``.git``; ``make gpu-dryrun`` writes it from HEAD before every call)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    sha = ROOT / ".whl" / "GIT_SHA"
    return head or (sha.read_text().strip() if sha.exists() else "unknown")


# ---- install ----------------------------------------------------------------------------------------


def install_wheels(wheels: Path, site: Path, timeout: float) -> dict:
    """``wheels/*.whl`` into ``site``: pip (no index, no deps, no compile), else plain unzip."""
    files = sorted(wheels.glob("*.whl"))
    start = time.time()
    if not files:
        return {"status": "skipped", "note": f"no wheels in {wheels}", "seconds": 0.0, "wheels": []}
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(site), *map(str, files)]
    how, note = "pip", None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout))
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip()[-500:])
    except Exception as err:  # no pip, or it failed: wheels are zip files (purelib at their root)
        how, note = "unzip", f"pip failed ({type(err).__name__}: {str(err)[:300]})"
        for wheel in files:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
    return {"status": "done", "how": how, "note": note, "seconds": round(time.time() - start, 1),
            "wheels": [w.name for w in files], "site": str(site)}


# ---- resume -----------------------------------------------------------------------------------------


def resume_source(path: Path | None, slug: str) -> Path | None:
    """The folder of an earlier call's results: ``path`` itself, or ``path/<slug>``."""
    if path is None:
        return None
    for candidate in (path, path / slug):
        if (candidate / "summary.json").exists() or any((candidate / f"{p}.json").exists() for p in PHASES):
            return candidate
    return None


def carry_in(source: Path | None, out: Path) -> dict:
    """The earlier call's phase files and log into ``out``; its summary (for the call history)."""
    if source is None or source.resolve() == out.resolve():
        return read_json(out / "summary.json") if source is not None else {}
    for name in (*(f"{p}.json" for p in PHASES), "log.txt"):
        if (source / name).exists() and not (out / name).exists():
            shutil.copyfile(source / name, out / name)
    return read_json(source / "summary.json")


# ---- limits -----------------------------------------------------------------------------------------


def enforce_limits(out: Path, scratch: Path) -> list[str]:
    """Keep ``out`` to what comes back: only ``FILES``, each under the size limit, nothing deeper.
    Everything else is moved to ``scratch``; returns what was moved or cut, for the summary."""
    notes = []
    for path in sorted(out.iterdir()):
        if path.name in FILES and path.is_file() and not path.is_symlink():
            continue
        scratch.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(scratch / path.name))
        notes.append(f"moved out of the results folder: {path.name}")
    for name in FILES:
        path = out / name
        if path.exists() and path.stat().st_size > LIMITS["file_bytes"]:
            if name == "log.txt":
                cap_log(path, LIMITS["file_bytes"] // 2)
                notes.append("log.txt cut to its first and last part")
            else:
                shutil.move(str(path), str(scratch / name))
                notes.append(f"{name} over {LIMITS['file_bytes']} bytes, moved out")
    return notes


def cap_log(path: Path, cap: int = LOG_CAP) -> None:
    size = path.stat().st_size
    if size <= cap:
        return
    with open(path, "rb") as f:
        head = f.read(cap // 2)
        f.seek(size - cap // 2)
        tail = f.read()
    path.write_bytes(head + f"\n[... {size - cap} bytes cut ...]\n".encode() + tail)


# ---- running steps ----------------------------------------------------------------------------------


def step_done(out: Path, phase: str, tier: int, slug: str) -> bool:
    """A step is finished when its phase file says its tier is complete on this device."""
    data = read_json(out / f"{phase}.json")
    plan = data.get("plan", [])
    complete = tier in data.get("complete_tiers", []) or (plan and tier not in {p.get("tier") for p in plan})
    return phase != "env" and data.get("device_slug") == slug and bool(complete)  # points are saved when finished


def run_step(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[str, int | None, float]:
    """Run ``cmd`` in its own process group and be back within ``timeout``: at ``timeout`` less a
    grace the group gets SIGTERM, half the grace later SIGKILL; a process that still does not go (stuck
    in a driver call, say) is left behind rather than waited for. (how, exit code, seconds)."""
    start = time.time()
    grace = min(3.0, max(0.2, 0.1 * timeout))
    with open(log, "ab") as f:
        f.write(f"\n==== {' '.join(cmd[2:])} (timeout {timeout:.0f} s) ====\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(0.1, timeout - grace))
            return "exited", code, time.time() - start
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace / 2)
                    break
                except subprocess.TimeoutExpired:
                    continue
            f.write(f"\n==== killed at its timeout of {timeout:.0f} s ====\n".encode())
            return "killed", None, time.time() - start


def step_status(out: Path, phase: str, how: str, code: int | None) -> tuple[str, str | None]:
    data = read_json(out / f"{phase}.json")
    status, note = data.get("status"), data.get("note")
    if how == "killed":
        return ("partial" if data.get("points") else "not run"), "killed at its timeout (finished points kept)"
    if code != 0 and status not in ("failed",):
        return "failed", note or f"exited with {code} before writing its status"
    return status or "failed", note


def main(argv: list[str] | None = None, steps: list | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the results folder ($OUT on the device)")
    p.add_argument("--deadline", type=float, default=500.0, help="seconds from start by which the summary is written")
    p.add_argument("--resume", default=None, help="earlier results: a results folder or results/gpu")
    p.add_argument("--wheels", default=str(ROOT / ".whl"))
    p.add_argument("--site", default=None, help="where the wheels are installed (default: a temporary folder)")
    p.add_argument("--profile", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    p.add_argument("--python", default=sys.executable, help="the Python that runs the phases")
    p.add_argument("--phase-module", default="harness.gpu_plan", help=argparse.SUPPRESS)  # tests: fake phases
    args = p.parse_args(argv)

    start = time.time()
    deadline_at = start + args.deadline
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-call-scratch-"))
    site = Path(args.site) if args.site else Path(tempfile.mkdtemp(prefix="gpu-call-site-"))
    slug = device_slug()
    steps = steps if steps is not None else STEPS
    if args.only:
        wanted = set(args.only.split(","))
        steps = [s for s in steps if s[0] in wanted]
    source = resume_source(Path(args.resume) if args.resume else None, slug)
    previous = carry_in(source, out)
    log = out / "log.txt"
    summary = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "git_sha": git_sha(), "device_slug": slug, "deadline_s": args.deadline, "started": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "resumed_from": str(source) if source else None,
        "calls": previous.get("calls", []), "install": None,
        "steps": [{"step": s, "phase": ph, "tier": t, "status": "not run", "note": "not reached"}
                  for s, ph, t, _ in steps],
        "limits": LIMITS, "moved_out": [], "finished": False,
    }

    def write_summary() -> None:
        summary["elapsed_s"] = round(time.time() - start, 1)
        summary["phases"] = {ph: read_json(out / f"{ph}.json") for ph in PHASES if (out / f"{ph}.json").exists()}
        summary["not_run"] = not_run(summary)
        summary["moved_out"] = sorted(set(summary["moved_out"]) | set(enforce_limits(out, scratch)))
        phases = summary.pop("phases")
        write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
        summary["phases"] = phases
        try:
            text = render(summary)
        except Exception as err:  # a malformed phase file must not cost the README: the steps at least
            text = (f"# Device call ({summary['device_slug']})\n\nRendering failed ({type(err).__name__}: {err}); "
                    "summary.json holds everything.\n\n" + "\n".join(
                        f"- {s['step']}: {s['status']} {s.get('note') or ''}" for s in summary["steps"]) + "\n")
        write_atomic(out / "README.md", text)
        if log.exists():
            cap_log(log)

    write_summary()  # a summary exists from the first second on

    def stop(signum, frame):  # killed from outside: the finally below still writes the summary
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        run_steps(args, steps, summary, out, site, scratch, slug, start, deadline_at, write_summary)
    except BaseException as err:  # the orchestrator itself broke: say so, then still write the summary
        summary["error"] = f"{type(err).__name__}: {err}"
    finally:
        summary["calls"] = [*summary["calls"], {"started": summary["started"], "git_sha": summary["git_sha"],
                                                "device_slug": slug, "deadline_s": args.deadline,
                                                "elapsed_s": round(time.time() - start, 1),
                                                "steps": {s["step"]: s["status"] for s in summary["steps"]}}]
        summary["finished"] = "error" not in summary
        write_summary()
        shutil.rmtree(scratch / "hf", ignore_errors=True)
    failed = [s["step"] for s in summary["steps"] if s["status"] == "failed"]
    print(f"gpu-call: {len(steps)} steps in {time.time() - start:.0f} s (deadline {args.deadline:.0f} s): "
          + ", ".join(f"{s['step']} {s['status']}" for s in summary["steps"]) + f" -> {out / 'README.md'}")
    return 1 if failed or "error" in summary else 0


def run_steps(args, steps, summary, out, site, scratch, slug, start, deadline_at, write_summary) -> None:
    log = out / "log.txt"
    summary["install"] = install_wheels(Path(args.wheels), site, min(120.0, max(1.0, (deadline_at - time.time()) / 4)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(scratch / "hf"), "MPLCONFIGDIR": str(scratch / "mpl")}
    write_summary()

    for i, (name, phase, tier, _) in enumerate(steps):
        entry = summary["steps"][i]
        if step_done(out, phase, tier, slug):
            entry.update(status="kept", note="finished in an earlier call", seconds=0.0)
            write_summary()
            continue
        reserved = sum(r * args.deadline for s, ph, t, r in steps[i + 1:] if not step_done(out, ph, t, slug))
        timeout = deadline_at - time.time() - summary_reserve(args.deadline) - reserved
        if timeout < MIN_STEP_S:
            entry.update(status="not run", note=f"{max(0.0, timeout):.0f} s left for it before the deadline")
            write_summary()
            continue
        stop_at = time.time() + timeout - 1.0  # the phase stops itself before its kill
        cmd = [args.python, "-m", args.phase_module, phase, "--out", str(out), "--tier", str(tier),
               "--profile", args.profile, "--stop-at", f"{stop_at:.1f}"]
        how, code, seconds = run_step(cmd, env, timeout, log)
        status, note = step_status(out, phase, how, code)
        entry.update(status=status, note=note, seconds=round(seconds, 1), timeout_s=round(timeout, 1), exit_code=code)
        write_summary()



# ---- the summary ------------------------------------------------------------------------------------


def not_run(summary: dict) -> list[str]:
    """Every planned point not measured yet, as ``phase: key``, and the steps never started."""
    items = []
    for ph, data in summary.get("phases", {}).items():
        items += [f"{ph}: {k}" for k in data.get("not_run", [])]
    started = {s["phase"] for s in summary["steps"] if s["status"] != "not run"} | set(summary.get("phases", {}))
    items += [f"{ph}: every point" for ph in PHASES if ph not in started]
    return items


def _f(value, fmt: str = "{:.2f}", none: str = "–") -> str:
    try:
        return none if value is None else fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def timing_rows(data: dict) -> list[list[str]]:
    rows = []
    for key, point in data.get("points", {}).items():
        if "error" in point:
            rows.append([key, "ERROR", point["error"][:120], *[""] * 9])
            continue
        for label, r in point.get("rows", {}).items():
            pred, frac = r.get("predicted_decode_speedup"), r.get("decode_speedup_of_predicted")
            ceiling = f"{pred:.2f} ({frac:.0%})" if pred and frac else "–"
            mem = r.get("peak_memory_bytes")
            rows.append([key, str(point.get("prompt_tokens")), label,
                         f"{_f(r.get('decode_tokens_per_s'), '{:.0f}')} ± "
                         f"{_f(r.get('decode_tokens_per_s_iqr'), '{:.0f}')}",
                         _f(r.get("decode_speedup")),
                         f"{_f(r.get('e2e_tokens_per_s'), '{:.0f}')} ± {_f(r.get('e2e_tokens_per_s_iqr'), '{:.0f}')}",
                         _f(r.get("e2e_speedup")), _f(r.get("prefill_ms"), "{:.1f}"),
                         _f(r.get("kv_cache_bytes") and r["kv_cache_bytes"] / 2**20, "{:.1f}"),
                         _f(r.get("kv_fraction"), "{:.3f}"), _f(mem and mem / 2**30, "{:.1f}"), ceiling])
    return rows


TIMING_HEADER = ["Point", "Prompt", "Variant", "Decode tok/s", "Decode ×", "E2E tok/s", "E2E ×", "Prefill ms",
                 "KV MiB", "KV ×", "Mem GiB", "Predicted × (achieved)"]


def render(summary: dict) -> str:
    phases = summary.get("phases", {})
    env = phases.get("env", {}).get("env", {})
    readings = env.get("readings", {})
    parts = [
        f"# Device call on {env.get('device_name') or summary['device_slug']}",
        "",
        "<!-- written by tools/gpu_call.py; do not edit -->",
        f"git {summary['git_sha']}, started {summary['started']}, deadline {summary['deadline_s']:.0f} s, "
        f"elapsed {summary.get('elapsed_s', 0):.0f} s{'' if summary.get('finished') else ' (still running or cut off)'}"
        + (f"; resumed from `{summary['resumed_from']}`" if summary.get("resumed_from") else "") + ".",
        "Speed-ups (×) are the variant over dense, higher is better, from one ABBA set per point; KV × is "
        "variant / dense bytes; ± is the IQR over repeats.",
        "",
        "## Steps",
        "",
        table(["Step", "Status", "Seconds", "Timeout", "Points done / planned", "Note"],
              [[s["step"], s["status"], _f(s.get("seconds"), "{:.0f}"), _f(s.get("timeout_s"), "{:.0f}"),
                _points(phases.get(s["phase"], {}), s["tier"]), (s.get("note") or "")[:160]]
               for s in summary["steps"]]),
    ]
    inst = summary.get("install") or {}
    parts += [f"Wheels: {inst.get('status', 'not run')} ({inst.get('how', '')}, {_f(inst.get('seconds'), '{:.0f}')} s"
              f"{'; ' + inst['note'] if inst.get('note') else ''}): {', '.join(inst.get('wheels', []))}.", ""]
    if env:
        tf = env.get("transformers", {})
        parts += ["## Environment", "",
                  f"torch {env.get('torch', {}).get('version')} (CUDA {env.get('torch_cuda')}), transformers "
                  f"{tf.get('version')} from `{tf.get('path')}`, Python {env.get('python')}; flash-attn 2: "
                  f"{env.get('flash_attn_2_available')}; {env.get('nvidia_smi', '')}", ""]
        if readings:
            bw, mm = readings.get("copy_fraction_of_peak_bandwidth"), readings.get("matmul_fraction_of_peak")
            parts += [f"Device-to-device copy {_f(readings.get('copy_tb_per_s'))} TB/s (read + written; "
                      f"{_f(bw and 100 * bw, '{:.0f}')} % of peak); bf16 8192³ matmul "
                      f"{_f(readings.get('matmul_bf16_tflops'), '{:.0f}')} TFLOP/s ({_f(mm and 100 * mm, '{:.0f}')} % "
                      "of peak).", ""]
    for ph, title in (("throughput", "Throughput: LLaVA-1.5-7B shape, float16, dense vs Lazy Attention"),
                      ("pruning", "Pruning methods at batch 8")):
        data = phases.get(ph)
        if data and data.get("points"):
            parts += [f"## {title} ({data.get('status')}, profile {data.get('profile')})", "",
                      table(TIMING_HEADER, timing_rows(data))]
    budget = phases.get("budget")
    if budget and budget.get("points"):
        rows = []
        for key, b in budget["points"].items():
            if not isinstance(b, dict):
                continue
            if "error" in b:
                rows.append([key, "ERROR", b["error"][:120], "", "", "", "", "", ""])
                continue
            for e in b.get("entries", []):
                mem = e.get("peak_memory_bytes")
                rows.append([key, f"{b.get('kind')} {_f(b.get('bytes') and b['bytes'] / 2**20, '{:.1f}')} MiB",
                             e["label"], str(e.get("max_batch")), _f(e.get("batch_ratio")),
                             _f(e.get("decode_tokens_per_s"), "{:.0f}"), _f(e.get("decode_speedup")),
                             f"{_f(e.get('e2e_tokens_per_s'), '{:.0f}')} (×{_f(e.get('e2e_speedup'))})",
                             _f(mem and mem / 2**30, "{:.1f}")])
        parts += [f"## Fixed budget ({budget.get('status')}, profile {budget.get('profile')})", "",
                  table(["Group", "Budget", "Variant", "Max B", "Batch ×", "Decode tok/s", "Decode ×", "E2E tok/s",
                         "Mem GiB"], rows)]
    corr = phases.get("correctness")
    if corr and corr.get("points") and isinstance(corr["points"].get("checks", {}), dict):
        parts += [f"## Correctness ({corr.get('status')}, profile {corr.get('profile')})", ""]
        checks = corr["points"].get("checks", {})
        parts += [f"Checks: " + ", ".join(f"{k} {'ok' if v.get('ok') else 'FAILED'}" for k, v in checks.items()
                                          if isinstance(v, dict)), ""]
        kernels = (corr.get("matrix") or {}).get("kernels", {})
        groups: dict = {}
        for key, c in corr["points"].items():
            if key == "checks" or "dtype" not in c:
                continue
            for impl in set(c.get("errors", {})) | set(c.get("impl_errors", {})):
                g = groups.setdefault((c["dtype"], impl), [0, 0, 0.0])
                err = c.get("errors", {}).get(impl)
                g[1] += 1
                tol = (corr.get("matrix") or {}).get("tolerance", {}).get(c["dtype"], 0)
                if err is not None and err <= tol:
                    g[0] += 1
                g[2] = max(g[2], err if err is not None else float("inf"))
        parts += [table(["dtype", "Compared with sdpa", "Kernel", "Within tolerance", "Max rel. error"],
                        [[d, i, kernels.get(i, i), f"{g[0]} / {g[1]}", _f(g[2], "{:.1e}")]
                         for (d, i), g in sorted(groups.items())])]
        cells = [c for k, c in corr["points"].items() if k != "checks" and "key" in c]
        bad = [c for c in cells if not c.get("ok")]
        parts += [f"{len(cells) - len(bad)} / {len(cells)} cells pass (KV formula, finite logits, every kernel within "
                  "tolerance)." + (" Failing:" if bad else ""), ""]
        parts += [f"- `{c['key']}`: " + "; ".join(
            [c.get("error", "")] + [f"{i} {v}" for i, v in c.get("impl_errors", {}).items()]
            + ([f"kv {c.get('kv')}"] if c.get("kv_ok") is False else [])
            + [f"{i} {_f(v, '{:.1e}')}" for i, v in c.get("errors", {}).items()]).strip("; ")[:300] for c in bad[:40]]
        parts += [""]
    todo = summary.get("not_run", [])
    parts += ["## Not run (for the next call)", ""] + ([f"- {t}" for t in todo] if todo else ["Nothing."]) + [""]
    if summary.get("moved_out"):
        parts += ["Moved out to keep within the return limits: " + "; ".join(summary["moved_out"]), ""]
    return "\n".join(parts)


def _points(data: dict, tier: int) -> str:
    plan = [p for p in data.get("plan", []) if p.get("tier") == tier]
    if not plan:
        return "–"
    done = sum(p["key"] in data.get("points", {}) for p in plan)
    return f"{done} / {len(plan)}"


def check_folder(out: Path) -> list[str]:
    """What in ``out`` would not come back from the device (``LIMITS``), and a missing summary."""
    problems, files = [], []
    for path in out.rglob("*"):
        depth = len(path.relative_to(out).parts) - 1  # folders above the file inside out
        if not NAME_OK.match(path.name):
            problems.append(f"odd name: {path.relative_to(out)}")
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"not a plain file: {path.relative_to(out)}")
        elif path.is_file():
            files.append(path)
            if depth > LIMITS["depth"]:
                problems.append(f"too deep: {path.relative_to(out)}")
            if path.stat().st_size > LIMITS["file_bytes"]:
                problems.append(f"over {LIMITS['file_bytes']} bytes: {path.relative_to(out)}")
    if len(files) > LIMITS["files"]:
        problems.append(f"{len(files)} files, more than {LIMITS['files']}")
    for name in ("README.md", "summary.json"):
        if not (out / name).is_file():
            problems.append(f"no {name}")
    return problems


def collect(source: Path, dest_root: Path) -> Path:
    """``make gpu-collect``: the returned files into ``dest_root/<device slug>/`` (README re-rendered)."""
    summary = read_json(source / "summary.json")
    slug = summary.get("device_slug") or "unknown"
    dest = dest_root / slug
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, dest / name)
    return dest


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--check":  # make gpu-dryrun: the limits, the summary, no failed step
        folder = Path(sys.argv[2])
        problems = check_folder(folder)
        done = read_json(folder / "summary.json")
        steps = done.get("steps", [])
        problems += [f"step {s['step']} failed: {s.get('note')}" for s in steps if s["status"] == "failed"]
        problems += [] if done.get("finished") else ["summary not finished: " + str(done.get("error"))]
        print(f"{folder}: {len(list(folder.iterdir()))} files, "
              + ", ".join(f"{s['step']} {s['status']}" for s in steps)
              + (f"; PROBLEMS: {problems}" if problems else "; within the device's return limits"))
        sys.exit(1 if problems else 0)
    if len(sys.argv) > 1 and sys.argv[1] == "--collect":
        print(collect(Path(sys.argv[2]), Path(sys.argv[3] if len(sys.argv) > 3 else ROOT / "results" / "gpu")))
        sys.exit(0)
    sys.exit(main())
