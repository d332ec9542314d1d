"""`tandem keys create | hash`: API keys for the gateway, stored only as their SHA-256.

tandem keys create --scopes inference --rpm 60 --tpm 20000 --name alice
    prints the new key (give it to the client; it is not stored anywhere) and the spec to put in
    the gateway's api_keys (config, --api-key, TANDEM_API_KEYS or the chart's Secret)
tandem keys hash KEY [--scopes ...]   the spec of an existing key
"""

from __future__ import annotations

import argparse
import secrets

from services.gateway.auth import SCOPES, ApiKey, digest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="make API keys (stored hashed, with scopes and rate limits)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_ in (("create", "a new random key and its spec"), ("hash", "the spec of an existing key")):
        q = actions.add_parser(name, help=help_)
        if name == "hash":
            q.add_argument("key")
        q.add_argument("--scopes", default=",".join(SCOPES), help=f"comma-separated, of {', '.join(SCOPES)}")
        q.add_argument("--rpm", type=int, default=0, help="requests per minute (0: unlimited)")
        q.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: unlimited)")
        q.add_argument("--name", default="key", help="shown in logs and rate-limit messages")
        q.set_defaults(func=cmd_keys)


def cmd_keys(args) -> int:
    scopes = frozenset(s.strip() for s in args.scopes.split(",") if s.strip())
    if not scopes or scopes - set(SCOPES):
        raise ValueError(f"--scopes must be among {', '.join(SCOPES)}, got '{args.scopes}'")
    if args.rpm < 0 or args.tpm < 0:
        raise ValueError("--rpm and --tpm must not be negative")
    if not args.name or any(c in args.name for c in ";=,"):
        raise ValueError("--name must be non-empty, without ';', '=' or ','")
    key = args.key if args.action == "hash" else "tk-" + secrets.token_urlsafe(32)
    spec = ApiKey(args.name, digest(key), scopes, args.rpm, args.tpm).spec()
    if args.action == "create":
        print(f"key:  {key}")
    print(f"spec: {spec}")
    return 0
