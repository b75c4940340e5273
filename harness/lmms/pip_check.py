"""``pip check``, honest about lmms-eval: only the documented skips may be reported.

lmms-eval is installed with ``--no-deps`` (see docs/benchmarks.md, "The lmms-eval backend"): ``pip check`` then
reports its declared requirements that were left out on purpose, listed with reasons in
``constraints/lmms-skipped.txt``. This runs ``pip check`` and fails on every other complaint:
a broken requirement of any other package, or an lmms-eval requirement not on the list.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SKIPPED = Path(__file__).resolve().parents[2] / "constraints" / "lmms-skipped.txt"
_LINE = re.compile(
    r"^(?P<pkg>\S+) \S+ "
    r"(requires (?P<missing>[^,]+), which is not installed|has requirement (?P<req>[A-Za-z0-9_.\-\[\]]+))"
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def skipped() -> set[str]:
    names = set()
    for line in SKIPPED.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonical(line))
    return names


def unexpected(report: str, allowed: set[str]) -> list[str]:
    bad = []
    for line in report.splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        m = _LINE.match(line)
        name = m and canonical(re.split(r"[<>=!~;\[ ]", m.group("missing") or m.group("req"))[0])
        if not (m and canonical(m.group("pkg")) == "lmms-eval" and name in allowed):
            bad.append(line)
    return bad


def main() -> int:
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    report = out.stdout + out.stderr
    bad = unexpected(report, skipped())
    accepted = len([line for line in report.splitlines() if line.strip()]) - len(bad)
    if bad:
        print("pip check: problems beyond lmms-eval's documented skips:\n  " + "\n  ".join(bad))
        return 1
    print(f"pip check: OK apart from {accepted} documented lmms-eval skip(s) ({SKIPPED.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
