"""How a validation failure reads: one line per problem, each naming its field (`router.policy:
Input should be …`), for every config and request spec parsed with pydantic (the deployment config,
training job specs)."""

from __future__ import annotations

from pydantic import ValidationError


def field_problems(e: ValidationError, whole: str = "config") -> str:
    """The problems of `e`, `; `-joined, each as `field.path: message` (`whole` when the input itself
    is at fault). A validator's message that already names a nested field keeps that name."""
    problems = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or whole
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        if msg.startswith(f"{where}.") and ": " in msg:
            where, msg = msg.split(": ", 1)
        problems.append(f"{where}: {msg}")
    return "; ".join(problems)
