"""Token-bucket rate limits, per client key (an IP address or a submitter token), in memory.

A bucket holds ``burst`` requests and refills at ``per_minute``; an empty bucket
answers how long until the next request is allowed (sent as Retry-After).
Buckets idle long enough to be full again are dropped, so memory stays bounded.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass


@dataclass
class Limit:
    per_minute: float
    burst: int


class RateLimiter:
    def __init__(self, limit: Limit, clock=time.monotonic, max_keys: int = 100_000) -> None:
        self.limit, self.clock, self.max_keys = limit, clock, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0.0 when allowed (and counted); otherwise the seconds to wait."""
        rate = self.limit.per_minute / 60.0
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key, (float(self.limit.burst), now))
            tokens = min(float(self.limit.burst), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                if len(self._buckets) > self.max_keys:
                    self._prune(now, rate)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate if rate > 0 else 3600.0

    def penalise(self, key: str, cost: float) -> None:
        """Take ``cost`` more from the key's bucket, below empty if need be (it then waits to refill)."""
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key, (float(self.limit.burst), now))
            tokens = min(float(self.limit.burst), tokens + (now - last) * self.limit.per_minute / 60.0)
            self._buckets[key] = (tokens - cost, now)

    def _prune(self, now: float, rate: float) -> None:
        full_after = self.limit.burst / rate if rate > 0 else float("inf")
        for key in [k for k, (_, last) in self._buckets.items() if now - last > full_after]:
            del self._buckets[key]


def client_address(peer: str | None, forwarded_for: str | None, trusted: frozenset[str]) -> str:
    """The client's address: the socket peer, unless that peer is a proxy the operator named
    (``--trust-proxy``); then the right-most X-Forwarded-For entry not itself a trusted proxy.
    Nobody else's X-Forwarded-For is read: a client cannot pick its own rate-limit key."""
    peer = peer or "unknown"
    if peer not in trusted or not forwarded_for:
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if hop and hop not in trusted:
            return hop[:64]
    return peer


def limit_key(address: str) -> str:
    """The rate-limit key of an address: IPv4 as it is, IPv6 by its /64 (one host gets a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if ip.version == 6:
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is that IPv4 host
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
