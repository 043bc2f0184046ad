"""UI-format ComfyUI workflows (what the frontend saves and ``example_workflows/`` holds) -> API-format prompts
(what ``/prompt`` and ``execution.PromptExecutor`` take), with each node type's live schema: the conversion the
frontend does in the browser (``graphToPrompt``), for the tests and the demos. Needs a started ComfyUI.

A UI workflow: ``{"nodes": [{"id", "type", "mode", "title", "inputs": [{"name", "type", "link", "widget"?}],
"outputs": [{"name", "type", "links"}], "widgets_values": [...]}], "links": [[id, origin node, origin slot, target
node, target slot, type], ...]}``. The frontend's rules, applied here:

* ``widgets_values`` holds one value per widget input in schema order (required, then optional), also for a widget
  converted to a socket (a link into it wins); it may also be a dict ``{input name: value}``. Inputs with
  ``control_after_generate`` (and INTs named ``seed``/``noise_seed``) are followed by the control widget's value, a
  combo's control also by a filter value; upload inputs by the upload button's value. A list shorter than the
  widgets (saved before widgets were appended) leaves the trailing ones at their defaults; one without a default is
  a problem.
* mode 2 (muted) nodes are left out with the inputs they fed; mode 4 (bypassed) nodes pass an input of the same type
  through to each output (same slot first, then the first input of that type).
* ``Note``/``MarkdownNote`` are dropped, ``Reroute`` nodes followed to their source, ``PrimitiveNode`` links dropped
  (the target widget holds the value). Subgraphs and group nodes are refused with a clear error.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
MODE_MUTED = 2
MODE_BYPASSED = 4


class WorkflowError(ValueError):
    pass


# ----------------------------------------------------------------------------- schema helpers

@dataclass
class InputSpec:
    name: str
    type: Any              # "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", or a socket type like "MODEL"
    options: dict
    optional: bool
    choices: list | None = None  # for combos

    @property
    def is_widget(self) -> bool:
        if self.options.get("forceInput"):
            return False
        return self.type in WIDGET_TYPES

    @property
    def has_control(self) -> bool:
        cag = self.options.get("control_after_generate")
        if cag is not None:
            return bool(cag)
        return self.type == "INT" and self.name in ("seed", "noise_seed")

    @property
    def has_upload(self) -> bool:
        return any(k.endswith("_upload") and v for k, v in self.options.items())


def node_inputs(node_cls) -> list[InputSpec]:
    """The node type's inputs (required then optional, schema order), from ``INPUT_TYPES()`` (V1 and V3)."""
    types = node_cls.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            raw_type = spec[0]
            opts = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
            choices = None
            if isinstance(raw_type, (list, tuple)):
                choices, t = list(raw_type), "COMBO"
            elif raw_type == "COMBO":
                choices, t = list(opts.get("options", [])), "COMBO"
            else:
                t = raw_type
            specs.append(InputSpec(name, t, opts, section == "optional", choices))
    return specs


def node_outputs(node_cls) -> list[str]:
    return list(node_cls.RETURN_TYPES)


# ----------------------------------------------------------------------------- workflow parsing

@dataclass
class Link:
    id: int
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: str


def parse_links(workflow: dict) -> dict[int, Link]:
    links = {}
    for raw in workflow.get("links", []) or []:
        if isinstance(raw, dict):
            l = Link(int(raw["id"]), str(raw["origin_id"]), int(raw["origin_slot"]), str(raw["target_id"]),
                     int(raw["target_slot"]), str(raw.get("type", "*")))
        else:
            l = Link(int(raw[0]), str(raw[1]), int(raw[2]), str(raw[3]), int(raw[4]), str(raw[5]) if len(raw) > 5 else "*")
        links[l.id] = l
    return links


def load_workflow(path: Path | str) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "nodes" not in data:
        raise WorkflowError(f"{path}: not a UI-format workflow (no 'nodes' list)")
    if (data.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError(f"{path}: subgraphs are not supported by this converter")
    return data


@dataclass
class WidgetAssignment:
    values: dict[str, Any] = field(default_factory=dict)
    controls: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)  # trailing widgets absent from widgets_values


def assign_widgets(node: dict, specs: list[InputSpec]) -> WidgetAssignment:
    """Map a UI node's ``widgets_values`` onto its widget inputs (see the module doc for the rules)."""
    out = WidgetAssignment()
    raw = node.get("widgets_values")
    widgets = [s for s in specs if s.is_widget]
    label = f"node {node.get('id')} ({node.get('type')})"
    if raw is None:
        raw = []
    if isinstance(raw, dict):
        for s in widgets:
            if s.name in raw:
                out.values[s.name] = raw[s.name]
        unknown = set(raw) - {s.name for s in widgets}
        if unknown:
            out.problems.append(f"{label}: widgets_values has unknown names {sorted(unknown)}")
        return out
    values = list(raw)
    i = 0
    for k, s in enumerate(widgets):
        if i >= len(values):
            missing = widgets[k:]
            no_default = [w.name for w in missing if "default" not in w.options]
            if no_default:
                out.problems.append(f"{label}: widgets_values has {len(values)} values, too few for its widgets "
                                    f"{[w.name for w in widgets]} (missing {no_default}, which have no default)")
                return out
            for w in missing:  # saved before these widgets existed: the frontend shows their defaults
                out.values[w.name] = w.options["default"]
                out.defaulted.append(w.name)
            return out
        out.values[s.name] = values[i]
        i += 1
        remaining_needed = len(widgets) - k - 1
        if s.has_control and i < len(values) and isinstance(values[i], str) and values[i] in CONTROL_VALUES:
            out.controls[s.name] = values[i]
            i += 1
            if s.type == "COMBO" and len(values) - i > remaining_needed and isinstance(values[i], str):
                i += 1  # the combo control's filter widget
        elif s.has_upload and len(values) - i > remaining_needed:
            i += 1  # the upload button's value
    if i != len(values):
        out.problems.append(f"{label}: widgets_values has {len(values)} values but the current schema has "
                            f"{len(widgets)} widgets {[w.name for w in widgets]}; extra: {values[i:]!r}")
    return out


def check_value(spec: InputSpec, value: Any) -> str | None:
    """Why ``value`` is not valid for widget ``spec`` (None when it is)."""
    o = spec.options
    if spec.type == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                return f"expected an integer, got {value!r}"
    elif spec.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"expected a number, got {value!r}"
    elif spec.type == "STRING":
        if not isinstance(value, str):
            return f"expected a string, got {value!r}"
    elif spec.type == "BOOLEAN":
        if not isinstance(value, bool):
            return f"expected true/false, got {value!r}"
    elif spec.type == "COMBO":
        if o.get("multiselect"):
            vals = value if isinstance(value, list) else [value]
            bad = [v for v in vals if v not in (spec.choices or [])]
            return f"{bad!r} not among the options {spec.choices!r}" if bad else None
        if value not in (spec.choices or []):
            shown = spec.choices if len(spec.choices or []) <= 20 else (spec.choices or [])[:20] + ["..."]
            return f"{value!r} is not one of the options {shown!r}"
        return None
    if spec.type in ("INT", "FLOAT"):
        if "min" in o and value < o["min"]:
            return f"{value!r} is below the minimum {o['min']!r}"
        if "max" in o and value > o["max"]:
            return f"{value!r} is above the maximum {o['max']!r}"
        step = o.get("step")
        if spec.type == "INT" and isinstance(step, int) and step > 1 and o.get("min", 0) % step == 0 and value % step:
            return f"{value!r} is not a multiple of the step {step}"
    return None


# ----------------------------------------------------------------------------- conversion

@dataclass
class Conversion:
    prompt: dict
    problems: list[str]
    controls: dict[str, dict[str, str]]  # node id -> {widget: control value}


def convert(workflow: dict, node_classes: dict[str, type], *, strict: bool = True) -> Conversion:
    """Convert a UI workflow to an API prompt with the schemas in ``node_classes``
    (``nodes.NODE_CLASS_MAPPINGS``). With ``strict`` any problem (unknown node type, widget count or value
    not valid for the current schema, a link of the wrong type) raises ``WorkflowError``."""
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = parse_links(workflow)
    problems: list[str] = []
    prompt: dict[str, dict] = {}
    controls: dict[str, dict[str, str]] = {}

    def mode(nid):
        return int(nodes[nid].get("mode", 0) or 0)

    def input_link_ids(n):
        return [inp.get("link") for inp in n.get("inputs", []) or []]

    def resolve(link_id, seen=()) -> tuple[str, int] | None:
        """Follow a link back to a real, active node's output: through Reroutes and bypassed nodes."""
        if link_id is None:
            return None
        link = links.get(int(link_id))
        if link is None:
            problems.append(f"link {link_id} is referenced but not in the links list")
            return None
        src = nodes.get(link.origin_id)
        if src is None:
            problems.append(f"link {link_id} comes from missing node {link.origin_id}")
            return None
        if link.origin_id in seen:
            problems.append(f"cycle through node {link.origin_id}")
            return None
        seen = (*seen, link.origin_id)
        stype = src.get("type")
        if stype == "Reroute":
            ids = input_link_ids(src)
            return resolve(ids[0] if ids else None, seen)
        if stype == "PrimitiveNode":
            return None  # the target widget holds the value
        m = mode(link.origin_id)
        if m == MODE_MUTED:
            return None
        if m == MODE_BYPASSED:
            out_type = link.type
            ins = src.get("inputs", []) or []
            cand = None
            if link.origin_slot < len(ins) and _types_match(ins[link.origin_slot].get("type"), out_type) \
                    and ins[link.origin_slot].get("link") is not None:
                cand = ins[link.origin_slot]
            else:
                cand = next((i for i in ins if _types_match(i.get("type"), out_type) and i.get("link") is not None), None)
            return resolve(cand.get("link"), seen) if cand else None
        return (link.origin_id, link.origin_slot)

    for nid, n in nodes.items():
        ntype = n.get("type")
        if ntype in FRONTEND_ONLY or mode(nid) in (MODE_MUTED, MODE_BYPASSED):
            continue
        cls = node_classes.get(ntype)
        if cls is None:
            problems.append(f"node {nid}: unknown node type {ntype!r}")
            continue
        specs = node_inputs(cls)
        by_name = {s.name: s for s in specs}
        wa = assign_widgets(n, specs)
        problems.extend(wa.problems)
        if wa.controls:
            controls[nid] = wa.controls
        inputs: dict[str, Any] = {}
        for name, value in wa.values.items():
            why = check_value(by_name[name], value)
            if why:
                problems.append(f"node {nid} ({ntype}) widget '{name}': {why}")
            inputs[name] = value
        for inp in n.get("inputs", []) or []:
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            if inp.get("link") is None:
                continue
            if name not in by_name:
                problems.append(f"node {nid} ({ntype}): input '{name}' is not in the current schema")
                continue
            src = resolve(inp["link"])
            if src is None:
                # muted source, or a PrimitiveNode: a widget keeps its own value, a socket stays empty
                continue
            src_node = nodes[src[0]]
            src_cls = node_classes.get(src_node.get("type"))
            if src_cls is not None:
                outs = node_outputs(src_cls)
                if src[1] >= len(outs):
                    problems.append(f"node {nid} ({ntype}) input '{name}': source node {src[0]} has no output {src[1]}")
                elif not _types_match(outs[src[1]], by_name[name].type):
                    problems.append(f"node {nid} ({ntype}) input '{name}' ({by_name[name].type}) is linked to "
                                    f"output {src[1]} of node {src[0]} ({outs[src[1]]})")
            inputs[name] = [src[0], src[1]]
        for s in specs:
            if not s.optional and s.name not in inputs:
                problems.append(f"node {nid} ({ntype}): required input '{s.name}' is neither a widget value "
                                "nor connected")
        entry = {"class_type": ntype, "inputs": inputs}
        if n.get("title"):
            entry["_meta"] = {"title": n["title"]}
        prompt[nid] = entry
    if strict and problems:
        raise WorkflowError("workflow does not match the current node schemas:\n  " + "\n  ".join(problems))
    return Conversion(prompt, problems, controls)


def _types_match(a, b) -> bool:
    if a is None or b is None:
        return True
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return True  # a combo-typed socket
    a, b = str(a), str(b)
    if a == "*" or b == "*" or a == b:
        return True
    return bool(set(t.strip() for t in a.split(",")) & set(t.strip() for t in b.split(",")))

