"""Error types shared by the whole package.

`UserError` is raised for anything the user can fix (config, input files, model names, a
missing stage input). The CLI prints its message as one line on stderr and exits with 2.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user asked for, with the fix in the message (CLI exit code 2)."""


class MissingDependencyError(UserError):
    """An optional package is not installed; the message holds the exact install command."""

    def __init__(self, package: str, extra: str | None = None, purpose: str = ""):
        fix = f"pip install 'compeffdist-ray[{extra}]'" if extra else f"pip install {package}"
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"the package '{package}' is not installed{what}; fix: {fix}")


def require(module: str, *, package: str | None = None, extra: str | None = None, purpose: str = ""):
    """Import an optional module or raise `MissingDependencyError` with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(package or module.split(".")[0], extra, purpose) from exc


def parse_json(text: str, where: object):
    """`json.loads(text)`, or a UserError naming `where` (a file) and the line and column at fault."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None


def read_json_file(path, what: str = "file"):
    """A UTF-8 (BOM allowed) JSON file's value; a UserError for a missing, undecodable or broken file."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_json(text, path)
