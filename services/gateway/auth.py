"""API keys with scopes, and per-key rate limits.

A key entry (config `gateway.api_keys`, `--api-key`, or `TANDEM_API_KEYS` comma-separated) is either
a plain key, allowed everything, or a spec that holds only the key's SHA-256:

    sha256:<64 hex>;scopes=inference+training;rpm=60;tpm=20000;name=alice

`tandem keys create --scopes inference --rpm 60` makes a new key and prints its spec. Presented keys
are hashed and compared in constant time against every stored digest. Scopes:

    inference   /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize
    training    /v1/files, /v1/fine_tuning/...
    admin       DELETE /v1/models/{id}, /metrics, /dashboard/status, /dashboard/targets

`/health` and the static pages (`/dashboard`, which asks for a key and sends it as a header, `/docs`,
`/openapi.json`) need none. Limits are token buckets refilled per second: `rpm` requests and `tpm`
tokens (prompt tokens when a request is admitted, generated tokens as they stream) per minute; a
bucket that cannot pay answers 429 with `Retry-After` (seconds until it can).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from dataclasses import dataclass, field

SCOPES = ("inference", "training", "admin")
PUBLIC = ("/health", "/dashboard", "/docs", "/docs/oauth2-redirect", "/openapi.json")


class KeySpecError(ValueError):
    """A malformed key spec (names the problem)."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = field(repr=False)
    scopes: frozenset[str] = frozenset(SCOPES)
    rpm: int = 0  # requests per minute (0: unlimited)
    tpm: int = 0  # tokens per minute (0: unlimited)

    def spec(self) -> str:
        parts = [f"sha256:{self.digest.hex()}", f"scopes={'+'.join(s for s in SCOPES if s in self.scopes)}"]
        parts += [f"{k}={v}" for k, v in (("rpm", self.rpm), ("tpm", self.tpm)) if v]
        return ";".join([*parts, f"name={self.name}"])


def tenant_salt(key: ApiKey, client_salt: str | None) -> str:
    """The prefix-cache salt of a request made with `key`: the key's own space (derived from its
    digest, so two keys never share cached blocks), subdivided by the client's `cache_salt`."""
    return f"{hashlib.sha256(b'tandem-cache' + key.digest).hexdigest()[:32]}:{client_salt or ''}"


def parse_key(entry: str, index: int = 0) -> ApiKey:
    """An ApiKey from a plain key or a `sha256:...;scopes=...;rpm=...;tpm=...;name=...` spec."""
    entry = entry.strip()
    if not entry.startswith("sha256:"):
        return ApiKey(f"key-{index}", digest(entry))
    head, *options = entry.split(";")
    hexdigest = head.removeprefix("sha256:")
    if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest.lower()):
        raise KeySpecError(f"api key {index}: sha256: needs 64 hex digits")
    values = {"name": f"key-{index}", "scopes": "+".join(SCOPES), "rpm": "0", "tpm": "0"}
    for option in options:
        k, sep, v = option.partition("=")
        if not sep or k not in values:
            raise KeySpecError(f"api key {index}: unknown option '{option}' (known: {', '.join(values)})")
        values[k] = v
    scopes = frozenset(s for s in values["scopes"].split("+") if s)
    if not scopes or scopes - set(SCOPES):
        raise KeySpecError(
            f"api key {index}: scopes must be among {', '.join(SCOPES)}, got '{values['scopes']}'"
        )
    try:
        rpm, tpm = int(values["rpm"]), int(values["tpm"])
    except ValueError as e:
        raise KeySpecError(f"api key {index}: rpm and tpm must be integers") from e
    if rpm < 0 or tpm < 0:
        raise KeySpecError(f"api key {index}: rpm and tpm must not be negative")
    return ApiKey(values["name"], bytes.fromhex(hexdigest), scopes, rpm, tpm)


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs (None: public)."""
    if path in PUBLIC:
        return None
    if path.startswith(("/v1/files", "/v1/fine_tuning")):
        return "training"
    if (method == "DELETE" and path.startswith("/v1/models/")) or path.startswith(
        ("/metrics", "/dashboard/")
    ):
        return "admin"
    return "inference"


class KeyRing:
    def __init__(self, entries=()):
        self.keys = [parse_key(e, i) for i, e in enumerate(entries)]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key whose digest matches (every stored digest is compared: no early exit)."""
        d = digest(presented)
        found = None
        for key in self.keys:
            if secrets.compare_digest(key.digest, d):
                found = key
        return found


class Bucket:
    """A token bucket: `capacity` per minute, refilled continuously; may go negative (debts)."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.clock = clock
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` can be paid (0: now)."""
        self._refill()
        need = min(amount, self.capacity) - self.level
        return need / self.rate if need > 0 else 0.0

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class RateLimits:
    """Per key: a requests bucket (rpm) and a tokens bucket (tpm)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.lock = threading.Lock()
        self.buckets: dict[tuple[str, str], Bucket] = {}

    def _bucket(self, key: ApiKey, kind: str) -> Bucket | None:
        limit = key.rpm if kind == "requests" else key.tpm
        if not limit:
            return None
        b = self.buckets.get((key.name, kind))
        if b is None:
            b = self.buckets[(key.name, kind)] = Bucket(limit, self.clock)
        return b

    def admit(self, key: ApiKey, kind: str, amount: float = 1) -> int:
        """Take `amount` from the key's `kind` bucket; 0 when admitted, else the whole seconds to wait
        (nothing taken)."""
        with self.lock:
            b = self._bucket(key, kind)
            if b is None:
                return 0
            wait = b.wait_for(amount)
            if wait > 0:
                return max(1, math.ceil(wait))
            b.take(amount)
            return 0

    def charge(self, key: ApiKey, kind: str, amount: float) -> None:
        """Take `amount` unconditionally (tokens already generated)."""
        with self.lock:
            b = self._bucket(key, kind)
            if b is not None:
                b.take(amount)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exposure_warning(host: str, keys) -> str | None:
    """A warning when the API listens beyond this machine with no key required."""
    if host in LOOPBACK or host.startswith("127.") or keys:
        return None
    return (f"warning: the API listens on {host} with no API key: anyone who reaches this address can use it "
            "(set gateway.api_keys, --api-key or TANDEM_API_KEYS)")  # fmt: skip


def plain_keys(entries) -> list[str]:
    """The entries that are keys themselves (not sha256 specs): what a local client can present."""
    return [e.strip() for e in entries if e.strip() and not e.strip().startswith("sha256:")]
