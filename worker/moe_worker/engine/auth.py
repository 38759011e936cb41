"""Rank membership that cannot be forged: every value the ranks put in the group's store is
signed with the group's secret, and every process group, when it forms, proves that each of its
members holds the secret.

The store (a TCPStore on rank 0) accepts connections from anyone who reaches its port, and the
process groups meet through it (torch.distributed has no authentication of its own). With the
secret (`RankConfig.rank_key`, the file MOE_RANK_KEY_FILE names: a Kubernetes Secret the operator
creates per deployment and mounts into every rank pod):

- `SignedStore` appends an HMAC-SHA256 of (store session, key name, value) to every value it sets,
  and a value that does not verify reads as absent (`check`) or is refused (`get`, WireError): a
  process without the secret can write keys, but no rank acts on them (a forged join, admission,
  decision, heartbeat, "broken" mark or expert map is ignored, and reported once).
- `membership_proof` is what each member of a newly formed process group sends the others (an
  all-gather right after the group forms): an HMAC of (session, prefix, member list, rank). A
  process that took a rank's place in the group's rendezvous cannot produce it, and the group
  refuses to serve with it.

The session is a random id the store's host (rank 0) writes, signed, when it creates the store;
every signature covers it, so nothing signed in an earlier store (before rank 0 was replaced) can
be replayed into this one.

Without a secret (a local group started by hand or by tests) values are stored as they are and
nothing is checked: say so in the log; the operator always provides one.

What this does not cover: the contents of collectives in flight (gloo/NCCL traffic is not
encrypted or authenticated; NetworkPolicies keep other pods off the ranks' ports) and a process
that holds the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Sequence
from typing import Any

from .steps import WireError

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16
SESSION_KEY = "session"
_SEP = b"|mac="
_MAC_HEX = 64


class SignedStore:
    """The group's store with signed values (see the module doc). Offers the calls the engine
    makes (`set`, `get`, `check`, `set_if_absent`, `delete_key`); `raw` is the TCPStore itself, for
    torch's own rendezvous of a process group."""

    def __init__(self, raw: Any, key: bytes | None, *, create_session: bool = False):
        self.raw, self.key = raw, key
        self._warned: set[str] = set()
        self.session = ""
        if key is not None and create_session:  # (other ranks read it on first use: `_session`)
            self.session = os.urandom(16).hex()
            self.raw.set(SESSION_KEY, self._sign(SESSION_KEY, self.session.encode(), session=""))

    # ---- signing ----

    def _mac(self, name: str, value: bytes, session: str) -> bytes:
        msg = session.encode() + b"\0" + name.encode() + b"\0" + value
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest().encode()

    def _sign(self, name: str, value: bytes, session: str | None = None) -> bytes:
        return value + _SEP + self._mac(name, value, self._session() if session is None else session)

    def _open(self, name: str, signed: bytes) -> bytes | None:
        """The value of a signed entry, or None (reported once per key) when it does not verify."""
        if self.key is None:
            return signed
        value, sep, mac = signed.rpartition(_SEP)
        session = "" if name == SESSION_KEY else self._session()
        if sep and len(mac) == _MAC_HEX and hmac.compare_digest(mac, self._mac(name, value, session)):
            return value
        if name not in self._warned:
            self._warned.add(name)
            log.warning("store key %r holds a value not signed with the group's secret; ignored", name)
        return None

    def session_id(self) -> str:
        """The store's session id ('' without a secret, or before the store's host wrote it)."""
        return self._session()

    def _session(self) -> str:
        if not self.session and self.key is not None and self.raw.check([SESSION_KEY]):
            value = self._open(SESSION_KEY, self.raw.get(SESSION_KEY))
            self.session = value.decode() if value else ""
        return self.session

    # ---- the store calls ----

    def set(self, name: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        self.raw.set(name, self._sign(name, data) if self.key is not None else data)

    def get(self, name: str) -> bytes:
        value = self._open(name, self.raw.get(name))
        if value is None:
            raise WireError(f"store key {name!r} holds a value not signed with the group's secret")
        return value

    def check(self, names: Sequence[str]) -> bool:
        """Every key is set, with a value that verifies."""
        if not self.raw.check(list(names)):
            return False
        return self.key is None or all(self._open(n, self.raw.get(n)) is not None for n in names)

    def set_if_absent(self, name: str, value: str) -> None:
        """Set `name` to `value` unless it holds a (verified) value already."""
        if self.check([name]):
            return
        self.set(name, value)

    def delete_key(self, name: str) -> bool:
        return self.raw.delete_key(name)

    @property
    def host(self) -> str:
        return self.raw.host

    @property
    def port(self) -> int:
        return self.raw.port


def membership_proof(key: bytes, session: str, prefix: str, members: Sequence[int], rank: int) -> bytes:
    """32 bytes that only a holder of `key` can produce for `rank` in this process group."""
    msg = f"{session}\0{prefix}\0{','.join(map(str, members))}\0{rank}".encode()
    return hmac.new(key, msg, hashlib.sha256).digest()


def read_key(path: str) -> bytes:
    """The group's secret from a file (a mounted Secret); ValueError naming the file otherwise."""
    try:
        data = open(path, "rb").read().strip()
    except OSError as e:
        raise ValueError(f"MOE_RANK_KEY_FILE {path}: {e.strerror or e}") from None
    if len(data) < MIN_KEY_BYTES:
        raise ValueError(f"MOE_RANK_KEY_FILE {path}: the key has {len(data)} bytes, at least {MIN_KEY_BYTES} needed")
    return data
