"""Structured logs: one JSON object per line, with the request id of the call being served.

    configure_logging("router")            # TANDEM_LOG_FORMAT=json (the default for services) | text
    request_id_var.set("chatcmpl-…")       # the gateway sets it; gRPC servers take it from metadata

Each line: {"ts", "level", "service", "logger", "message", "request_id"?, "exc"?}. The gateway makes
(or takes from the client's X-Request-Id header) the request id, sends it as `x-request-id` metadata
to the tokenizer and router, the router sends it on to the workers, and every gRPC server's
interceptor puts it in `request_id_var` for the call, so one request can be followed from gateway to
decode with a grep.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__(f"%(asctime)s {service} %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [request_id={request_id}]" if request_id else line


def configure_logging(service: str, fmt: str | None = None, level: int = logging.INFO) -> None:
    """Route the root logger through one stderr handler in `fmt` (json | text; default from
    TANDEM_LOG_FORMAT, else json). Replaces handlers set before (idempotent)."""
    fmt = (fmt or os.environ.get("TANDEM_LOG_FORMAT") or "json").lower()
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, got '{fmt}'")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
