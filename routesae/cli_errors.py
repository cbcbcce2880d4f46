"""How the command line reports errors a user can fix: one red line on stderr and exit status 2."""

from __future__ import annotations

from typing import NoReturn

import typer

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, FileExistsError)


def fail(exc: Exception) -> NoReturn:
    """Print ``error: <one line>`` and exit with status 2."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)
