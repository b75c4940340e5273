"""Tables to Markdown and LaTeX files (``out/tables``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness.report.tables import table_notes


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latex(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(text: str) -> str:
        return (text.replace("%", r"\%").replace("_", r"\_").replace("Δ", r"$\Delta$").replace("×", r"$\times$")
                .replace("†", r"$^\dagger$"))

    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", " & ".join(map(esc, header)) + r" \\", r"\midrule"]
    lines += [" & ".join(map(esc, row)) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(name: str, header, rows, out: Path, source: str) -> list[Path]:
    folder = out / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    md, tex = folder / f"{name}.md", folder / f"{name}.tex"
    notes = table_notes(header, rows)
    md.write_text(f"<!-- rendered by `python -m harness.report` from {source}; do not edit -->\n" + markdown(header, rows)
                  + "".join(f"\n{n}\n" for n in notes))
    tex.write_text(f"% rendered by `python -m harness.report` from {source}\n" + latex(header, rows)
                   + "".join(f"% {n}\n" for n in notes))
    return [md, tex]
