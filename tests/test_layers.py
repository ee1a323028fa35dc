"""The import graph, read from the source (every import, those under TYPE_CHECKING and inside
functions included): the SDK and shared modules under zeroserve/ import no room; broker/,
workers/ and gateway/ import neither each other nor the tooling; no two modules import each
other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = {"zeroserve": "zeroserve", "broker": "zeroserve.broker", "workers": "zeroserve.workers",
         "gateway": "zeroserve.gateway", "tooling": "zeroserve.tooling"}


def _modules() -> dict[str, tuple[str, Path]]:
    """Module name -> (its room, its file)."""
    out = {}
    for room, package in ROOMS.items():
        for path in (ROOT / room).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / room).with_suffix("").parts
                     if p != "__init__"]
            out[".".join([package, *parts])] = (room, path)
    return out


def _graph() -> tuple[dict[str, str], dict[str, set[str]]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (_, path) in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return {m: room for m, (room, _) in modules.items()}, graph


def test_each_room_imports_only_what_stands_below_it() -> None:
    room, graph = _graph()
    assert len(graph) > 80 and "zeroserve.gateway.generate" in graph["zeroserve.gateway.app"]
    below = {"zeroserve": {"zeroserve"}, "broker": {"zeroserve", "broker"},
             "workers": {"zeroserve", "workers"}, "gateway": {"zeroserve", "gateway"},
             "tooling": set(ROOMS)}
    wrong = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                   if room[b] not in below[room[a]])
    assert not wrong, wrong


def test_no_two_modules_import_each_other() -> None:
    _, graph = _graph()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a in graph[b]})
    assert not pairs, pairs
