"""app/pipecat is a Pipecat service usable in any pipeline: it reaches workers only through
WorkerRouter, never Redis or the gateway."""

from __future__ import annotations

import ast
from pathlib import Path

PIPECAT_DIR = Path(__file__).resolve().parents[2] / "app" / "pipecat"
PLAIN_CALLSTATE_NAMES = {"EndReason", "Reservation"}  # an enum and a model: no Redis behind them


def imports(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [alias.name for alias in node.names]))
    return out


def test_no_module_of_the_service_imports_redis_or_the_gateway() -> None:
    modules = sorted(PIPECAT_DIR.glob("*.py"))
    assert {p.name for p in modules} >= {"service.py", "pacer.py", "tape.py", "worker_link.py", "router.py"}
    for path in modules:
        for module, names in imports(path):
            assert not module.startswith(("redis", "app.gateway")), f"{path.name} imports {module}"
            if module == "app.callstate":
                assert set(names) <= PLAIN_CALLSTATE_NAMES, f"{path.name} imports {names} from app.callstate"
