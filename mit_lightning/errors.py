"""Errors a user can act on, and the path checks that raise them.

The CLI prints a `UserError` as one message (what is wrong, what to do) instead of a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, get_args


class UserError(Exception):
    """Bad input, missing data or missing weights: the message tells the user what to do."""


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Refuse a value outside a `Literal` type at construction.

    The CLI parser checks `Literal` arguments itself; this does the same for Python callers, for
    whom a value outside the type would otherwise pick a branch silently or fail deep in a forward.
    """
    allowed = get_args(choices)
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}.")


def user_error_in(error: BaseException | None) -> UserError | None:
    """The UserError an exception was raised while handling (its cause or context chain), if any.

    jsonargparse reports a class that failed to build (e.g. one of a union type) as its own error
    listing every alternative; the user's actual problem is the UserError it was handling.
    """
    while error is not None:
        if isinstance(error, UserError):
            return error
        error = error.__cause__ or error.__context__
    return None


_ENV_PATTERN = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def expand_env(value: str) -> str:
    """Expand `${VAR}` and `${VAR:-default}` so configs can read paths from the environment.

    An unset variable without a default is an error: silently expanding it to "" would point at
    the current directory.
    """

    def substitute(match: re.Match) -> str:
        name, default = match.group("name"), match.group("default")
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            return default
        raise UserError(f"The path '{value}' needs the environment variable {name}; set it, or give the path directly.")

    return os.path.expanduser(_ENV_PATTERN.sub(substitute, value))


def existing_path(value: str | os.PathLike, what: str, hint: str, *, is_dir: bool | None = None) -> Path:
    """Resolve `value` (env vars expanded) and check it exists; `what`/`hint` make the error actionable."""
    path = Path(expand_env(str(value)))
    kind = {True: "directory", False: "file", None: "path"}[is_dir]
    if not path.exists():
        raise UserError(f"{what} not found: expected a {kind} at '{path}'. {hint}")
    if is_dir is True and not path.is_dir():
        raise UserError(f"{what} must be a directory, but '{path}' is a file. {hint}")
    if is_dir is False and not path.is_file():
        raise UserError(f"{what} must be a file, but '{path}' is a directory. {hint}")
    return path


def make_folder(value: str | os.PathLike, what: str, hint: str) -> Path:
    """Create the folder `value` (parents included) or say in one line why it cannot be: a file or a dangling
    symbolic link in its place, no permission, a read-only or full disk."""
    path = Path(value).expanduser()
    if path.is_symlink() and not path.exists():
        raise UserError(f"{what} '{path}' is a symbolic link to '{os.readlink(path)}', which does not exist. {hint}")
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file, not a folder. {hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"Cannot create {what.lower()} '{path}' ({error.strerror or error}). {hint}") from None
    return path
