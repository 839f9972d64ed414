"""The client's address behind a reverse proxy: ``X-Forwarded-For``, believed only from trusted proxies.

The same trust setting as the console's (``QUOTAGATE_FORWARDED_ALLOW_IPS``: addresses, or ``*``). Read
from right to left, each hop added by a trusted proxy is skipped; the first address a trusted proxy did
not vouch for is the client. From an untrusted peer the header is ignored (anyone can send one). The
address matters for a key's ``allowed_networks``, the failed-authentication throttle and usage rows.
"""

from __future__ import annotations


class ForwardedFor:
    def __init__(self, trusted: str) -> None:
        hosts = {h.strip() for h in trusted.split(",") if h.strip()}
        self._any = "*" in hosts
        self._trusted = frozenset(hosts - {"*"})

    def trusts(self, peer: str | None) -> bool:
        return peer is not None and (self._any or peer in self._trusted)

    def client(self, peer: str | None, header: bytes) -> str | None:
        """The client's address, given the connection's ``peer`` and its X-Forwarded-For ``header``."""
        if not self.trusts(peer):
            return peer
        hops = [h.strip() for h in header.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else peer
