#!/usr/bin/env python3
"""The pack's node schemas as a contract: what saved workflows depend on.

``python -m scripts.schema_snapshot --write`` (or ``make snapshot``) regenerates tests/schema_snapshot.json;
``--check`` prints the differences with it (exit 1 if any). A node's contract is what ComfyUI serves in
``/object_info`` for it (``GET_NODE_INFO_V1`` for V3 nodes), restricted to ``PINNED_NODE_KEYS``: id, display name,
category, output-node and status flags, every input (section, order, type, default, min, max, step, options,
control_after_generate...; all but the tooltip) and the outputs. ComfyUI's other fields vary with its version, as do
the wording and ``python_module``: they are neither recorded nor compared, so one snapshot holds on every supported
ComfyUI; within the pinned fields any change counts. Regenerate it only for a deliberate change, and say in the
commit what it breaks.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "tests" / "schema_snapshot.json"
PINNED_NODE_KEYS = ("input", "input_order", "output", "output_is_list", "output_name", "name", "display_name",
                    "category", "output_node", "deprecated", "experimental", "api_node")
IGNORED_OPTION_KEYS = {"tooltip"}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or type(x) in (str, int, float, bool):
        return x
    for t in (bool, int, float, str):  # enum members and other subclasses -> plain JSON values
        if isinstance(x, t):
            return t(x)
    return str(x)


def node_info(cls, node_id: str) -> dict:
    """What /object_info shows for ``cls`` (V3: GET_NODE_INFO_V1; V1: the same fields from the class)."""
    if hasattr(cls, "GET_NODE_INFO_V1"):
        info = dict(cls.GET_NODE_INFO_V1())
    else:
        types = cls.INPUT_TYPES()
        info = {
            "input": types, "input_order": {k: list(v) for k, v in types.items()},
            "output": list(cls.RETURN_TYPES),
            "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "name": node_id, "display_name": node_id, "category": getattr(cls, "CATEGORY", "sd"),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        }
    return _jsonable(info)


def contract(cls, node_id: str) -> dict:
    info = node_info(cls, node_id)
    out = {k: info[k] for k in PINNED_NODE_KEYS if k in info}
    inputs = {}
    for section, entries in (info.get("input") or {}).items():
        sec = {}
        for name, spec in (entries or {}).items():
            spec = list(spec) if isinstance(spec, list) else [spec]
            if len(spec) > 1 and isinstance(spec[1], dict):
                spec = [spec[0], {k: v for k, v in spec[1].items() if k not in IGNORED_OPTION_KEYS}, *spec[2:]]
            sec[name] = spec
        inputs[section] = sec
    out["input"] = inputs
    return out


def missing_tooltips(cls, node_id: str) -> list[str]:
    """Inputs (required/optional) of the node without a non-empty tooltip."""
    info = node_info(cls, node_id)
    missing = []
    for section in ("required", "optional"):
        for name, spec in ((info.get("input") or {}).get(section) or {}).items():
            opts = spec[1] if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not str(opts.get("tooltip") or "").strip():
                missing.append(f"{node_id}.{name}")
    return missing


def unpinned_keys(cls, node_id: str) -> list[str]:
    """The node-info fields this ComfyUI serves that the contract leaves out (ComfyUI's own, version-dependent)."""
    return [k for k in node_info(cls, node_id) if k not in PINNED_NODE_KEYS]


def live_contracts(rt) -> dict[str, dict]:
    return {nid: contract(rt.nodes.NODE_CLASS_MAPPINGS[nid], nid) for nid in sorted(rt.pack_node_ids)}


def load_snapshot(path: Path = SNAPSHOT) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def dumps(value: Any, indent: int = 0, width: int = 110) -> str:
    """JSON with every list/dict that fits in ``width`` characters on one line (short, reviewable diffs)."""
    flat = json.dumps(value)
    if not isinstance(value, (dict, list)) or len(flat) + indent <= width:
        return flat
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    items = [f"{inner}{dumps(v, indent + 1, width)}" for v in value]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]"


def write_snapshot(contracts: dict, path: Path = SNAPSHOT) -> None:
    path.write_text(dumps(contracts) + "\n")


def diff(old: Any, new: Any, where: str = "") -> list[str]:
    """Readable differences between two JSON values, one line each."""
    lines: list[str] = []
    if isinstance(old, dict) and isinstance(new, dict):
        for k in old:
            if k not in new:
                lines.append(f"- {where}{k}: removed (was {json.dumps(old[k])[:200]})")
        for k in new:
            if k not in old:
                lines.append(f"+ {where}{k}: added {json.dumps(new[k])[:200]}")
            else:
                lines.extend(diff(old[k], new[k], f"{where}{k}."))
        if list(k for k in old if k in new) != list(k for k in new if k in old):
            lines.append(f"~ {where.rstrip('.') or '(top)'}: order changed {list(old)} -> {list(new)}")
        return lines
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            lines.extend(diff(a, b, f"{where}{i}."))
        return lines
    if old != new or type(old) is not type(new):
        lines.append(f"~ {where.rstrip('.')}: {json.dumps(old)[:200]} -> {json.dumps(new)[:200]}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help=f"regenerate {SNAPSHOT.relative_to(ROOT)}")
    g.add_argument("--check", action="store_true", help="print differences, exit 1 if any")
    opts = ap.parse_args()
    from devtools import headless
    rt = headless.start()
    live = live_contracts(rt)
    old = load_snapshot()
    changes = diff(old, live)
    if opts.write:
        write_snapshot(live)
        print(f"wrote {SNAPSHOT} ({len(live)} nodes: {', '.join(live)})")
        for line in changes:
            print("  " + line)
        return 0
    for line in changes:
        print(line)
    return 1 if changes else 0


if __name__ == "__main__":
    sys.exit(main())
