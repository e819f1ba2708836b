"""The ``d2serve`` command line: a thin typer app that parses options, calls the API and prints with rich.

No logic lives here. Exit codes: 0 success, 1 a check failed (fidelity,
parity), 2 bad usage or bad input (the message names the file/tensor/field).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
export_app = typer.Typer(no_args_is_help=True, help="Export a merged model for a serving runtime.")
app.add_typer(export_app, name="export")
console = Console()
err_console = Console(stderr=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
