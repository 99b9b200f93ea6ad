"""Bearer tokens for the served models: where the token comes from, and a constant-time check.

Pure (no Ray, no web framework). The token itself never leaves the process that resolves it:
replicas receive only its SHA-256 digest and compare digests with `hmac.compare_digest`, so
neither Serve's stored deployment arguments nor any log or error body holds the secret.

Lookup order: the environment variable `serve.token_env` (default `COMPEFFDIST_SERVE_TOKEN`),
then the file `serve.token_file`; without either, `compeffdist serve` generates a token into
`<cache>/serve/token` (mode 0600, printed as a path, never as the token), and the Serve config
builders (`serve run` / `serve deploy`) refuse to start.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from compeffdist_ray.errors import UserError

__all__ = ["MIN_TOKEN_CHARS", "Token", "bearer_ok", "default_token_file", "ensure_token_file", "resolve_token",
           "token_digest"]

MIN_TOKEN_CHARS = 16
_MAKE_ONE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


@dataclass(frozen=True)
class Token:
    """A resolved token: the secret (keep it in this process) and where it came from (safe to print)."""

    value: str
    source: str

    def __repr__(self) -> str:  # never print the secret by accident
        return f"Token(source={self.source!r})"

    @property
    def digest(self) -> str:
        return token_digest(self.value)


def token_digest(token: str) -> str:
    """SHA-256 hex digest of a token: what replicas store and compare against."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_ok(authorization: str | None, digest: str) -> bool:
    """True when an `Authorization` header value carries the token whose digest is `digest`.

    The comparison is between fixed-length digests with `hmac.compare_digest`, so its time does
    not depend on how much of the token was right. The scheme name is case-insensitive (RFC 7235).
    """
    if not authorization or not digest:
        return False
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    presented = presented.strip()
    if not presented:
        return False
    got = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    try:
        want = bytes.fromhex(digest)
    except ValueError:
        return False
    return hmac.compare_digest(got, want)


def _check_strength(token: str, source: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"the serve token from {source} has {len(token)} characters; use at least "
                        f"{MIN_TOKEN_CHARS}, e.g. the output of {_MAKE_ONE}")
    if any(c.isspace() for c in token):
        raise UserError(f"the serve token from {source} contains whitespace; use a single word, e.g. the output "
                        f"of {_MAKE_ONE}")


def _read_token_file(path: str) -> str:
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"serve.token_file {p} does not exist; write a token into it ({_MAKE_ONE} > {p}; "
                        f"chmod 600 {p}) or set the token variable instead")
    try:
        return p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"serve.token_file {p} is not readable as text ({type(exc).__name__})") from None


def resolve_token(token_env: str, token_file: str | None, *, environ: Mapping[str, str] | None = None,
                  generated_file: str | os.PathLike | None = None) -> Token:
    """The bearer token: `$token_env`, else `token_file`, else (when given) a generated file.

    Raises UserError with the ways to set one when there is none (and no `generated_file`).
    """
    env = os.environ if environ is None else environ
    value = (env.get(token_env) or "").strip()
    if value:
        token = Token(value, f"the environment variable {token_env}")
    elif token_file:
        token = Token(_read_token_file(token_file), f"the file {pathlib.Path(token_file).expanduser()} (serve.token_file)")
        if not token.value:
            raise UserError(f"serve.token_file {token_file} is empty; write a token into it ({_MAKE_ONE})")
    elif generated_file is not None:
        path, made = ensure_token_file(generated_file)
        token = Token(_read_token_file(str(path)), f"the file {path} ({'generated now' if made else 'generated earlier'}, "
                                                   f"mode 0600)")
    else:
        raise UserError(f"no serve token: every route but /health needs a bearer token; set {token_env} "
                        f"(export {token_env}=$({_MAKE_ONE})) or serve.token_file=PATH")
    _check_strength(token.value, token.source)
    return token


def default_token_file() -> pathlib.Path:
    from compeffdist_ray.models import cache_dir

    return cache_dir() / "serve" / "token"


def ensure_token_file(path: str | os.PathLike) -> tuple[pathlib.Path, bool]:
    """Create `path` with a new random token, mode 0600 from the start, unless it exists.

    Returns (path, created). An existing file readable by group or others is refused.
    """
    p = pathlib.Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise UserError(f"the token file {p} is readable by others (mode {mode:o}); chmod 600 {p} "
                            "or delete it to have a new one generated") from None
        return p, False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return p, True
