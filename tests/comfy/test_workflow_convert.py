"""The UI -> API workflow converter against ComfyUI's real schemas (stock nodes + the pack): widget order,
control_after_generate values, converted widgets, optional inputs, muted/bypassed nodes, frontend-only
nodes, and the schema problems it must report."""
import copy

import pytest

from devtools import workflow as wc


def _node(nid, ntype, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    n = {"id": nid, "type": ntype, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
         "widgets_values": widgets if widgets is not None else []}
    if title:
        n["title"] = title
    return n


def _inp(name, typ, link=None, widget=False):
    d = {"name": name, "type": typ, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


@pytest.fixture(scope="module")
def classes(comfy):
    return comfy.nodes.NODE_CLASS_MAPPINGS


def _ksampler_graph():
    """Empty latent -> KSampler (model etc. from a checkpoint loader) -> VAEDecode -> SaveImage."""
    nodes = [
        _node(1, "CheckpointLoaderSimple", ["x.safetensors"]),
        _node(2, "CLIPTextEncode", ["a cat"], [_inp("clip", "CLIP", 2)]),
        _node(3, "CLIPTextEncode", [""], [_inp("clip", "CLIP", 3)]),
        _node(4, "PanoramaLatent", [1024, 512, 1]),
        _node(5, "KSampler", [42, "randomize", 20, 7.0, "euler", "normal", 1.0],
              [_inp("model", "MODEL", 1), _inp("positive", "CONDITIONING", 4), _inp("negative", "CONDITIONING", 5),
               _inp("latent_image", "LATENT", 6)], title="Sampler"),
        _node(6, "VAEDecode", [], [_inp("samples", "LATENT", 7), _inp("vae", "VAE", 8)]),
        _node(7, "SaveImage", ["out"], [_inp("images", "IMAGE", 9)]),
    ]
    links = [[1, 1, 0, 5, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 1, 1, 3, 0, "CLIP"],
             [4, 2, 0, 5, 1, "CONDITIONING"], [5, 3, 0, 5, 2, "CONDITIONING"], [6, 4, 0, 5, 3, "LATENT"],
             [7, 5, 0, 6, 0, "LATENT"], [8, 1, 2, 6, 1, "VAE"], [9, 6, 0, 7, 0, "IMAGE"]]
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_widgets_links_and_control_after_generate(classes):
    conv = wc.convert(_ksampler_graph(), classes, strict=False)
    p = conv.prompt
    # only the checkpoint name is unknown here (no such file): everything else matches the schemas
    assert [x for x in conv.problems if "x.safetensors" not in x] == []
    assert p["5"]["class_type"] == "KSampler"
    assert p["5"]["inputs"] == {"seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                                "denoise": 1.0, "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                "latent_image": ["4", 0]}
    assert conv.controls == {"5": {"seed": "randomize"}}
    assert p["5"]["_meta"] == {"title": "Sampler"}
    assert p["4"]["inputs"] == {"width": 1024, "height": 512, "batch_size": 1}
    assert p["6"]["inputs"] == {"samples": ["5", 0], "vae": ["1", 2]}
    assert p["7"]["inputs"] == {"filename_prefix": "out", "images": ["6", 0]}


def test_links_as_objects_and_dict_widgets(classes):
    wf = _ksampler_graph()
    wf["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), l))
                   for l in wf["links"]]
    wf["nodes"][3]["widgets_values"] = {"width": 768, "height": 256, "batch_size": 2}
    p = wc.convert(wf, classes, strict=False).prompt
    assert p["4"]["inputs"] == {"width": 768, "height": 256, "batch_size": 2}
    assert p["5"]["inputs"]["latent_image"] == ["4", 0]


def test_converted_widget_takes_the_link(classes):
    wf = _ksampler_graph()
    # a PanoramaLatent whose width widget was converted to an input, fed by another node's INT output
    wf["nodes"].append(_node(8, "PrimitiveInt", [640], outputs=[{"name": "INT", "type": "INT", "links": [10]}]))
    wf["nodes"][3]["inputs"] = [_inp("width", "INT", 10, widget=True)]
    wf["links"].append([10, 8, 0, 4, 0, "INT"])
    p = wc.convert(wf, classes, strict=False).prompt
    assert p["4"]["inputs"]["width"] == ["8", 0]
    assert p["4"]["inputs"]["height"] == 512


def test_primitive_node_and_note_are_frontend_only(classes):
    wf = _ksampler_graph()
    wf["nodes"].append(_node(9, "PrimitiveNode", [77], outputs=[{"name": "INT", "type": "INT", "links": [11]}]))
    wf["nodes"].append(_node(10, "MarkdownNote", ["# hello"]))
    wf["nodes"][4]["inputs"].append(_inp("seed", "INT", 11, widget=True))
    wf["nodes"][4]["widgets_values"][0] = 77  # the frontend copies the primitive's value into the widget
    wf["links"].append([11, 9, 0, 5, 4, "INT"])
    conv = wc.convert(wf, classes, strict=False)
    assert "9" not in conv.prompt and "10" not in conv.prompt
    assert conv.prompt["5"]["inputs"]["seed"] == 77


def test_muted_and_bypassed_nodes(classes):
    wf = _ksampler_graph()
    # LatentUpscaleBy between the latent and the sampler, bypassed: the sampler gets the latent directly
    wf["nodes"].append(_node(11, "LatentUpscaleBy", ["nearest-exact", 1.5], [_inp("samples", "LATENT", 12)],
                             mode=wc.MODE_BYPASSED))
    wf["links"] = [l for l in wf["links"] if l[0] != 6] + [[12, 4, 0, 11, 0, "LATENT"], [6, 11, 0, 5, 3, "LATENT"]]
    p = wc.convert(wf, classes, strict=False).prompt
    assert "11" not in p
    assert p["5"]["inputs"]["latent_image"] == ["4", 0]

    muted = copy.deepcopy(wf)
    muted["nodes"][-1]["mode"] = wc.MODE_MUTED
    conv = wc.convert(muted, classes, strict=False)
    assert "latent_image" not in conv.prompt["5"]["inputs"]
    assert any("required input 'latent_image'" in x for x in conv.problems)


def test_reroute_is_followed(classes):
    wf = _ksampler_graph()
    wf["nodes"].append(_node(12, "Reroute", [], [_inp("", "*", 13)]))
    wf["links"] = [l for l in wf["links"] if l[0] != 8] + [[13, 1, 2, 12, 0, "VAE"], [8, 12, 0, 6, 1, "VAE"]]
    p = wc.convert(wf, classes, strict=False).prompt
    assert p["6"]["inputs"]["vae"] == ["1", 2]


def test_optional_inputs_of_the_pack_sampler(classes):
    """SyncDiffusionSampler: its optional anchor stays out when unconnected and is linked when connected."""
    specs = wc.node_inputs(classes["SyncDiffusionSampler"])
    widgets = [s for s in specs if s.is_widget]
    assert widgets[0].name == "seed" and widgets[0].has_control
    optional_sockets = [s.name for s in specs if s.optional and not s.is_widget]
    assert "anchor" in optional_sockets
    values = []
    for s in widgets:
        values.append(s.options.get("default"))
        if s.has_control:
            values.append("fixed")
    sampler = _node(5, "SyncDiffusionSampler", values,
                    [_inp("model", "MODEL", 1), _inp("positive", "CONDITIONING", 4),
                     _inp("negative", "CONDITIONING", 5), _inp("vae", "VAE", 8), _inp("latent_image", "LATENT", 6),
                     _inp("anchor", "SYNCDIFF_ANCHOR", None)])
    wf = _ksampler_graph()
    wf["nodes"][4] = sampler
    wf["links"] = [l if l[0] != 8 else [8, 1, 2, 5, 3, "VAE"] for l in wf["links"]]
    wf["links"] = [l for l in wf["links"] if l[0] not in (7, 9)]
    wf["nodes"] = [n for n in wf["nodes"] if n["id"] not in (6, 7)]
    conv = wc.convert(wf, classes, strict=False)
    assert [x for x in conv.problems if "x.safetensors" not in x] == []
    ins = conv.prompt["5"]["inputs"]
    assert "anchor" not in ins
    assert {s.name for s in widgets} <= set(ins)

    anchor = _node(13, "AnchorSelector", ["index", 2], outputs=[{"name": "anchor", "type": "SYNCDIFF_ANCHOR",
                                                                  "links": [14]}])
    wf["nodes"].append(anchor)
    sampler["inputs"][-1]["link"] = 14
    wf["links"].append([14, 13, 0, 5, 5, "SYNCDIFF_ANCHOR"])
    p = wc.convert(wf, classes, strict=False).prompt
    assert p["5"]["inputs"]["anchor"] == ["13", 0]
    assert p["13"]["inputs"] == {"mode": "index", "index": 2}


@pytest.mark.parametrize("mutate,expect", [
    (lambda wf: wf["nodes"][3].__setitem__("widgets_values", [1024, 512, 1, 9]), "extra"),
    (lambda wf: wf["nodes"][3].__setitem__("widgets_values", [1024, 512, 0]), "below the minimum"),
    (lambda wf: wf["nodes"][3].__setitem__("widgets_values", [1020, 512, 1]), "multiple of the step"),
    (lambda wf: wf["nodes"][3].__setitem__("widgets_values", ["wide", 512, 1]), "expected an integer"),
    (lambda wf: wf["nodes"][4]["widgets_values"].__setitem__(4, "no_such_sampler"), "not one of the options"),
    (lambda wf: wf["nodes"][4]["widgets_values"].__setitem__(3, True), "expected a number"),
    (lambda wf: wf["nodes"][0].__setitem__("type", "NoSuchLoader"), "unknown node type"),
    (lambda wf: wf["links"].__setitem__(5, [6, 1, 0, 5, 3, "LATENT"]), "is linked to output 0 of node 1 (MODEL)"),
])
def test_schema_problems_are_reported(classes, mutate, expect):
    wf = _ksampler_graph()
    mutate(wf)
    conv = wc.convert(wf, classes, strict=False)
    assert any(expect in x for x in conv.problems), conv.problems
    with pytest.raises(wc.WorkflowError, match="does not match"):
        wc.convert(wf, classes, strict=True)


def test_subgraphs_are_refused(classes):
    wf = _ksampler_graph()
    wf["definitions"] = {"subgraphs": [{"id": "abc"}]}
    with pytest.raises(wc.WorkflowError, match="subgraph"):
        wc.convert(wf, classes)


def test_missing_trailing_widgets_take_their_defaults():
    """A workflow saved before widgets were appended keeps loading: the missing ones get their defaults (as the
    frontend does); a missing widget without a default is a problem."""
    specs = [wc.InputSpec("width", "INT", {"default": 2048}, False, None),
             wc.InputSpec("height", "INT", {"default": 512}, False, None),
             wc.InputSpec("mode", "COMBO", {"default": "a"}, False, ["a", "b"])]
    got = wc.assign_widgets({"id": 1, "type": "T", "widgets_values": [1024]}, specs)
    assert got.values == {"width": 1024, "height": 512, "mode": "a"}
    assert got.defaulted == ["height", "mode"] and got.problems == []
    specs[2] = wc.InputSpec("mode", "COMBO", {}, False, ["a", "b"])
    got = wc.assign_widgets({"id": 1, "type": "T", "widgets_values": [1024]}, specs)
    assert any("too few" in p and "'mode'" in p for p in got.problems), got.problems
