"""``python -m harness.bench``: see ``harness.bench.cli``."""

from harness.bench.cli import main
from harness.command_line import check_command_line

check_command_line("bench")
main()
