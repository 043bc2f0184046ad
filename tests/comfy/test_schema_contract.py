"""Schema contract: every node the pack registers is pinned in tests/schema_snapshot.json (id, display name,
category, inputs with types/defaults/ranges/options and required vs optional, outputs). A change that would
break saved workflows fails here with a readable diff. For a deliberate change: ``make snapshot`` (runs
``python -m scripts.schema_snapshot --write``), review ``git diff tests/schema_snapshot.json``, commit it."""
import pytest

from scripts import schema_snapshot as ss

HOW_TO_UPDATE = ("If this change is deliberate (saved workflows may break), run `make snapshot` and commit "
                 "tests/schema_snapshot.json.")


@pytest.fixture(scope="module")
def live(comfy):
    return ss.live_contracts(comfy)


@pytest.fixture(scope="module")
def snapshot():
    snap = ss.load_snapshot()
    assert snap, f"{ss.SNAPSHOT} is missing or empty. {HOW_TO_UPDATE}"
    return snap


def test_every_registered_node_is_in_the_snapshot(live, snapshot):
    new = sorted(set(live) - set(snapshot))
    gone = sorted(set(snapshot) - set(live))
    assert not new, f"nodes registered by the pack but not pinned in the snapshot: {new}. {HOW_TO_UPDATE}"
    assert not gone, f"nodes pinned in the snapshot but no longer registered (breaks saved workflows): {gone}"


def test_node_schemas_match_the_snapshot(live, snapshot):
    problems = []
    for nid in sorted(set(live) & set(snapshot)):
        for line in ss.diff(snapshot[nid], live[nid], f"{nid}."):
            problems.append(line)
    assert not problems, "node schemas differ from tests/schema_snapshot.json:\n" + "\n".join(problems) + \
        "\n" + HOW_TO_UPDATE


def test_every_pinned_field_is_served_by_this_comfyui(comfy, live, snapshot):
    """The contract's fields exist on this ComfyUI for every node; what it serves beyond them is ComfyUI's own
    (0.33 adds is_input_list, output_matchtypes, dev_only, price_badge, has_intermediate_output) and unpinned."""
    for nid, c in live.items():
        assert tuple(c) == ss.PINNED_NODE_KEYS, (nid, list(c))
        assert tuple(snapshot[nid]) == ss.PINNED_NODE_KEYS, (nid, list(snapshot[nid]))
        extra = ss.unpinned_keys(comfy.nodes.NODE_CLASS_MAPPINGS[nid], nid)
        assert not set(extra) & set(ss.PINNED_NODE_KEYS)


def test_comfyui_fields_are_ignored_but_input_changes_are_not():
    """A field ComfyUI adds to every node's info is not a change; a change to the pack's own inputs still is."""
    base = {"input": {"required": {"steps": ["INT", {"default": 50, "min": 1, "tooltip": "how many"}]}},
            "input_order": {"required": ["steps"]}, "output": ["LATENT"], "output_is_list": [False],
            "output_name": ["LATENT"], "name": "N", "display_name": "N", "category": "c", "output_node": False,
            "deprecated": False, "experimental": False, "api_node": False, "python_module": "custom_nodes.x"}

    def node(info):
        return type("N", (), {"GET_NODE_INFO_V1": classmethod(lambda cls: info)})

    old = ss.contract(node(base), "N")
    newer_comfy = dict(base, is_input_list=False, output_matchtypes=None, dev_only=False, price_badge=None,
                       has_intermediate_output=False, python_module="custom_nodes.y")
    assert ss.diff(old, ss.contract(node(newer_comfy), "N")) == []
    assert ss.unpinned_keys(node(newer_comfy), "N") == ["python_module", "is_input_list", "output_matchtypes",
                                                        "dev_only", "price_badge", "has_intermediate_output"]
    changed = dict(newer_comfy, input={"required": {"steps": ["INT", {"default": 30, "min": 1}],
                                                    "seed": ["INT", {}]}})
    lines = ss.diff(old, ss.contract(node(changed), "N"))
    assert "~ input.required.steps.1.default: 50 -> 30" in lines
    assert any(line.startswith("+ input.required.seed") for line in lines)
    renamed_output = dict(newer_comfy, output_name=["latent"])
    assert ss.diff(old, ss.contract(node(renamed_output), "N")) == ['~ output_name.0: "LATENT" -> "latent"']


def test_every_input_has_a_tooltip(comfy):
    missing = []
    for nid in comfy.pack_node_ids:
        missing += ss.missing_tooltips(comfy.nodes.NODE_CLASS_MAPPINGS[nid], nid)
    assert not missing, f"inputs without a tooltip: {missing}"


def test_one_category_and_a_display_name_for_every_node(live):
    for nid, c in live.items():
        assert c["name"] == nid
        assert c["category"].startswith("sampling/syncdiffusion"), (nid, c["category"])
        assert str(c.get("display_name") or "").strip(), f"{nid} has no display name"


def test_diff_is_readable():
    old = {"N": {"input": {"required": {"steps": ["INT", {"default": 50, "min": 1}]}}, "output": ["LATENT"]}}
    new = {"N": {"input": {"required": {"steps": ["INT", {"default": 30, "min": 1}], "seed": ["INT", {}]}},
                 "output": ["LATENT"]}}
    lines = ss.diff(old, new)
    assert "~ N.input.required.steps.1.default: 50 -> 30" in lines
    assert any(line.startswith("+ N.input.required.seed") for line in lines)
    assert ss.diff(new, new) == []


def test_workflows_saved_before_the_sampler_gained_widgets_still_convert(comfy):
    """Widgets are only ever appended to the sampler: a workflow saved with the first 12 widget values converts,
    the newer widgets taking their defaults (the behaviour of the pack before they existed)."""
    import json
    from pathlib import Path

    from devtools import workflow as wc

    wf = json.loads((Path(__file__).resolve().parents[2] / "example_workflows" /
                     "syncdiffusion_panorama.json").read_text())
    sampler = next(n for n in wf["nodes"] if n["type"] == "SyncDiffusionSampler")
    sampler["widgets_values"] = sampler["widgets_values"][:12]
    conv = wc.convert(wf, comfy.nodes.NODE_CLASS_MAPPINGS, strict=False)
    inputs = conv.prompt[str(sampler["id"])]["inputs"]
    assert (inputs["loss_decoder"], inputs["sync_batch"], inputs["compile"]) == ("vae_checkpointed", 0, False)
    assert [p for p in conv.problems if "SyncDiffusionSampler" in p] == []


def test_sampler_inputs_added_later_are_optional(snapshot):
    """API-format prompts written before loss_decoder/sync_batch/compile existed must still validate: inputs
    added after the first release are optional (with defaults), never required."""
    first_release = ["model", "positive", "negative", "vae", "latent_image", "seed", "steps", "cfg", "window_size",
                     "stride", "sync_weight", "sync_decay", "sync_steps", "sync_every", "wrap", "window_batch"]
    sampler = snapshot["SyncDiffusionSampler"]
    assert sampler["input_order"]["required"] == first_release
    for name in ("loss_decoder", "sync_batch", "compile", "memory_cap_gb"):
        assert name in sampler["input"]["optional"], name
    assert "memory_cap_gb" in snapshot["SyncDiffusionCustomSampler"]["input"]["optional"]


def test_anchor_selector_modes_are_only_appended(comfy, snapshot):
    """A saved Anchor Selector stores its widgets [mode, index] by position and its mode by name: the first modes
    keep their names, order and meaning, later modes (kept region) come after them, and inputs added later (mask)
    are optional sockets, not widgets, so old widget values keep their positions."""
    import torch
    spec = snapshot["AnchorSelector"]
    assert spec["input_order"]["required"] == ["mode", "index"]
    assert spec["input"]["required"]["mode"][1]["options"][:3] == ["center", "index", "reference image"]
    assert set(spec["input"]["optional"]) >= {"image", "mask"}
    node = comfy.nodes.NODE_CLASS_MAPPINGS["AnchorSelector"]
    got = {m: node.execute(mode=m, index=2, image=torch.rand(1, 8, 8, 3)).args[0]
           for m in ("center", "index", "reference image")}
    assert (got["center"].mode, got["index"].mode, got["index"].index, got["reference image"].mode) == \
        ("center", "index", 2, "image")
