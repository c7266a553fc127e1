"""API keys: ``Authorization: Bearer KEY`` on every endpoint but ``/health``.

Policy: ``--api-key`` repeats, one key per client. A conversation belongs to the key
that created it; another key's requests get 404 for it, as if it did not exist (its id
reveals nothing). The owner is recorded as a digest of the key (``owner_of``), never the
key itself, so the snapshot folder holds no secret. Without keys the server is open and
every conversation is everyone's (the default bind, 127.0.0.1, keeps it to this machine).
"""

from __future__ import annotations

import hashlib
import hmac

from .schemas import APIError

OPEN = ""  # the owner of every conversation on a server without keys


def owner_of(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeys:
    def __init__(self, keys: list[str] | tuple[str, ...] = ()):
        self.keys = tuple(keys)

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def owner(self, authorization: str | None) -> str:
        """The owner a request acts for, from its ``Authorization`` header; 401 without a
        valid key when keys are required."""
        if not self.keys:
            return OPEN
        if not authorization:
            raise APIError(401, "Missing bearer authentication in header (Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")
        scheme, _, given = authorization.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "The Authorization header must be 'Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")
        match = [hmac.compare_digest(given.encode(), k.encode()) for k in self.keys]  # every key, constant time
        if not any(match):
            raise APIError(401, "Incorrect API key provided", type="authentication_error", code="invalid_api_key")
        return owner_of(given)
