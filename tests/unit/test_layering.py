"""Layers point one way: shared/ (the common library) imports no service; each service imports
shared/ and its own package, never another service; only the platform layer (services/platform: the
CLI and the Ray actors) wires services together. Checked on the source, import by import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_shared_imports_no_service():
    wrong = [
        f"{p.relative_to(ROOT)}: {m}"
        for p in modules("shared")
        for m in imports(p)
        if m.split(".")[0] == "services"
    ]
    assert not wrong, wrong


def test_a_service_imports_no_other_service():
    wrong = []
    for p in modules("services"):
        own = p.relative_to(ROOT / "services").parts[0]
        if own == "platform" or p.parent == ROOT / "services":
            continue
        for m in imports(p):
            parts = m.split(".")
            if parts[0] == "services" and len(parts) > 1 and parts[1] != own:
                wrong.append(f"{p.relative_to(ROOT)}: {m}")
    assert not wrong, wrong


def test_the_router_gateway_kv_store_and_tokenizer_start_without_torch():
    """They need SamplingParams, the block keys and TokenLogprob (shared/core), not the engine: a
    process importing them (and building them: their main modules) never loads torch (≈0.3 GB each)."""
    import subprocess
    import sys

    code = (
        "import sys, services.router.main, services.router.server, services.gateway.main, services.gateway.app, "
        "services.kvstore.main, services.kvstore.server, services.tokenizer.main, services.tokenizer.server, "
        "services.controller.main, shared.core.kv_hash; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('shared.engine')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
