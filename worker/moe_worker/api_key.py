"""The optional API key of the serving ports: `Authorization: Bearer <key>` (as OpenAI's clients
send it), compared in constant time with the key in a file, which the operator mounts from the
Secret that `spec.serving.apiKeySecret` names (MOE_API_KEY_FILE).

The file is looked at again (one stat) at most every RECHECK_S seconds, and read again when it
changed: the kubelet swaps a mounted Secret's files atomically, so a rotated key takes effect
without restarting the group. A file that goes bad keeps the key last read.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 4096
RECHECK_S = 1.0


def read_key(path: str) -> bytes:
    """The key in `path`, surrounding whitespace stripped (`kubectl create secret --from-file`
    keeps a trailing newline); ValueError unless it is 1..MAX_KEY_BYTES visible ASCII characters,
    which is what fits in an HTTP header and in gRPC metadata."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_KEY_BYTES + 64)
    except OSError as e:
        raise ValueError(f"cannot read the API key file {path}: {e.strerror or e}") from None
    key = raw.strip()
    if not key:
        raise ValueError(f"the API key file {path} is empty")
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(f"the API key in {path} is longer than {MAX_KEY_BYTES} bytes")
    if any(b < 0x21 or b > 0x7E for b in key):
        raise ValueError(f"the API key in {path} must be visible ASCII characters without spaces")
    return key


def bearer_token(authorization: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` value (scheme in any case), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogateescape")


class ApiKey:
    """The key requests must carry, read from `path` (ValueError at construction when it is bad)."""

    def __init__(self, path: str, recheck_s: float = RECHECK_S):
        self.path, self.recheck_s = path, recheck_s
        self._lock = threading.Lock()
        self._key = read_key(path)
        self._stat = self._stat_of()
        self._checked = time.monotonic()

    def _stat_of(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows the kubelet's ..data symlink to the current file
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def current(self) -> bytes:
        """The key, read again when the file changed since it was last looked at."""
        now = time.monotonic()
        if now - self._checked < self.recheck_s:
            return self._key
        with self._lock:
            self._checked = now
            st = self._stat_of()
            if st is not None and st != self._stat:
                try:
                    self._key = read_key(self.path)
                    self._stat = st
                    log.info("API key file %s changed: using the new key", self.path)
                except ValueError as e:
                    log.warning("%s; keeping the key read before", e)
        return self._key

    def accepts(self, authorization: str | None) -> bool:
        """Whether an Authorization header (or gRPC `authorization` metadata) carries the key."""
        token = bearer_token(authorization)
        return token is not None and hmac.compare_digest(token, self.current())
