"""Access control: bearer API keys for the OpenAI routes, separate admin keys for ``/ecobatch/batching``.

Keys come from a file (one per line, ``#`` comments) and/or an environment variable (comma-separated),
both named in the settings; they are never logged (only their number). A request's token is compared
with every key in constant time (SHA-256 digests through ``hmac.compare_digest``, no early exit), so
neither a key's content nor its length leaks through timing.

* ``/v1/*`` and ``/ecobatch/energy/*``: an API key, when any is configured (else open, with a warning at
  start-up); a missing or wrong key is a 401 in the OpenAI error form.
* ``/ecobatch/batching``: an admin key; with none configured these routes are disabled (403).
* ``/health`` and ``/metrics`` stay open for probes and scrapers (``server.metrics_port`` moves
  ``/metrics`` to a port of its own).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import ServerSettings
from ..errors import ConfigError, EcobatchError

__all__ = [
    "AccessDenied",
    "AccessKeys",
    "AdminDisabled",
    "Keys",
    "check_admin_key",
    "check_api_key",
    "load_keys",
]


class AccessDenied(EcobatchError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class AdminDisabled(EcobatchError):
    status = 403
    error_type = "invalid_request_error"
    code = "admin_disabled"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Keys:
    """A set of keys, kept as digests."""

    digests: tuple[bytes, ...]

    @property
    def configured(self) -> bool:
        return bool(self.digests)

    def accepts(self, token: str) -> bool:
        probe = _digest(token)
        found = False
        for digest in self.digests:  # no early exit: the time does not say which key matched
            found |= hmac.compare_digest(probe, digest)
        return found


def _read(file: str | None, env: str | None, field: str) -> Keys:
    keys: list[str] = []
    if file:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(
                f"{field}_file={file!r} cannot be read: {exc.strerror or exc}", field=field
            ) from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if env and os.environ.get(env):
        keys += [k.strip() for k in os.environ[env].split(",") if k.strip()]
    return Keys(tuple(_digest(k) for k in keys))


@dataclass(frozen=True, slots=True)
class AccessKeys:
    api: Keys
    admin: Keys


def load_keys(server: ServerSettings) -> AccessKeys:
    """The API and admin keys from the files and environment variables the settings name."""
    return AccessKeys(
        _read(server.api_keys_file, server.api_keys_env, "server.api_keys"),
        _read(server.admin_keys_file, server.admin_keys_env, "server.admin_keys"),
    )


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def check_api_key(keys: Keys, authorization: str | None) -> None:
    if not keys.configured:
        return
    token = bearer(authorization)
    if token is None:
        raise AccessDenied("You didn't provide an API key: send 'Authorization: Bearer <key>'")
    if not keys.accepts(token):
        raise AccessDenied("Incorrect API key provided")


def check_admin_key(keys: Keys, authorization: str | None) -> None:
    if not keys.configured:
        raise AdminDisabled(
            "the admin routes are disabled: set an admin key (server.admin_keys_file, or the environment "
            "variable named by server.admin_keys_env, ECOBATCH_ADMIN_KEYS by default)"
        )
    token = bearer(authorization)
    if token is None or not keys.accepts(token):
        raise AccessDenied("this route needs an admin key: send 'Authorization: Bearer <admin key>'")
