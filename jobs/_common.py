"""Shared by the jobs/*.py entry points for `ray job submit --working-dir . -- python jobs/X.py`.

A submitted job runs in a copy of the uploaded working directory, where rayseg may not be
installed: the directory above jobs/ goes first on sys.path so `import rayseg` finds the uploaded
code (Ray puts the same directory on the workers' path). Everything else - flags, --config,
one-line errors, exit codes - is the CLI's.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_command(command: str, argv: list[str] | None = None) -> int:
    """`rayseg <command> <argv>` (default: this script's arguments); returns the exit status."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from rayseg.cli import main

    return main([command, *(sys.argv[1:] if argv is None else argv)])
