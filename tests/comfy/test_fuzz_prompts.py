"""Fuzzed prompts against the real server: API prompts with random values for every input of every pack node (any
type, out-of-range and huge numbers, NaN/inf, odd strings, missing inputs, links to wrong types, missing nodes or
slots, odd masks, 1-pixel images) POSTed to /prompt as the UI posts them. Each case must end, within CASE_TIMEOUT_S,
in a validation error, one of the pack's clear errors raised before heavy work (ValueError and its kin, never an
IndexError or a torch RuntimeError from deep inside), or a finished run; the server must stay up with an empty queue
and leave no temporary or unreadable file.

The node under test comes from /object_info (a new node or input is fuzzed unchanged), its values from the schema's
types and limits; producers of linked inputs are small fixed graphs. Valid values that only make a run longer
(``steps``/``sync_steps`` above 2, ``compile``, decode ``padding`` above 64) are kept cheap. ``SYNCDIFF_FUZZ_EXAMPLES``
(80) sets the cases; ``SYNCDIFF_RELIABILITY_OUT=file.json`` writes the outcome counts. Cases are derandomized.
"""
import json
import os
import time
from collections import Counter

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from devtools import harness as h  # noqa: E402
from devtools.server import ONE_THREAD, Server, get, post, running  # noqa: E402

EXAMPLES = int(os.environ.get("SYNCDIFF_FUZZ_EXAMPLES", "80"))
CASE_TIMEOUT_S = 240  # a valid run takes 0.1-60 s on a loaded 2-core machine; this only guards against hangs
STOP_TIMEOUT_S = 60

#: Exceptions that are clear answers to bad input (by class name; the pack's own subclasses of ValueError too).
CLEAR_ERRORS = ("ValueError", "TrunkFileError", "TrunkWeightsNotFound", "OutputFolderError", "FloatingPointError")

OUTCOMES: Counter = Counter()
ERROR_KINDS: Counter = Counter()
PER_NODE: dict = {}
MODES: dict = {}
SLOWEST: list = [0.0, ""]


# ------------------------------------------------------------------------------------------------ the graph around it

def producers(ckpt: str) -> dict:
    """Nodes that make every input type a pack node takes, small and valid; the node under test links to them."""
    def node(cls, **inputs):
        return {"class_type": cls, "inputs": inputs}

    return {
        "p_ckpt": node("CheckpointLoaderSimple", ckpt_name=ckpt),
        "p_pos": node("CLIPTextEncode", clip=["p_ckpt", 1], text=h.DEFAULT_PROMPT),
        "p_neg": node("CLIPTextEncode", clip=["p_ckpt", 1], text=""),
        "p_region": node("LayoutMaskRegion", conditioning=["p_pos", 0], mask=["p_mask_left", 0], bootstrap_fraction=0.5,
                         soft_mask=False, regions=["p_neg", 0]),
        "p_lat": node("PanoramaLatent", width=128, height=64, batch_size=1),
        "p_lat_one": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "p_lat_odd": node("EmptyLatentImage", width=200, height=72, batch_size=2),
        "p_img_1px": node("EmptyImage", width=1, height=1, batch_size=1, color=0xFF0000),
        "p_img_odd": node("EmptyImage", width=13, height=7, batch_size=1, color=0x00FF00),
        "p_img_pano": node("EmptyImage", width=128, height=64, batch_size=2, color=0x336699),
        "p_img_decoded": node("VAEDecode", samples=["p_lat", 0], vae=["p_ckpt", 2]),
        "p_mask_empty": node("SolidMask", value=0.0, width=128, height=64),
        "p_mask_left": node("SolidMask", value=1.0, width=64, height=64),
        "p_mask_1px": node("SolidMask", value=1.0, width=1, height=1),
        "p_mask_odd": node("SolidMask", value=0.5, width=7, height=3),
        "p_anchor": node("AnchorSelector", mode="center", index=0),
        "p_anchor_image": node("AnchorSelector", mode="reference image", index=0,
                               image=["p_img_1px", 0]),
    }


#: Producer links by type (slot 0 unless said).
LINKS = {
    "MODEL": [["p_ckpt", 0]], "CLIP": [["p_ckpt", 1]], "VAE": [["p_ckpt", 2]],
    "CONDITIONING": [["p_pos", 0], ["p_neg", 0], ["p_region", 0]],
    "LATENT": [["p_lat", 0], ["p_lat_one", 0], ["p_lat_odd", 0]],
    "IMAGE": [["p_img_decoded", 0], ["p_img_pano", 0], ["p_img_1px", 0], ["p_img_odd", 0]],
    "MASK": [["p_mask_empty", 0], ["p_mask_left", 0], ["p_mask_1px", 0], ["p_mask_odd", 0]],
    "SYNCDIFF_ANCHOR": [["p_anchor", 0], ["p_anchor_image", 0]],
}
ALL_LINKS = [link for links in LINKS.values() for link in links]


def consumers(node_id: str, outputs: list[str]) -> dict:
    """Nodes that take the node under test's outputs to an output node (cheaply, and validly for the right type)."""
    out = {}
    for slot, kind in enumerate(outputs):
        src = [node_id, slot]
        if kind == "IMAGE":
            out[f"c{slot}"] = {"class_type": "SaveImage", "inputs": {"images": src, "filename_prefix": "fuzz/img"}}
        elif kind in ("CONDITIONING", "SYNCDIFF_ANCHOR"):
            inputs = {"model": ["p_ckpt", 0], "positive": src if kind == "CONDITIONING" else ["p_pos", 0],
                      "negative": ["p_neg", 0], "vae": ["p_ckpt", 2], "latent_image": ["p_lat", 0], "seed": 1,
                      "steps": 1, "cfg": 5.0, "window_size": 64, "stride": 64, "sync_weight": 20.0,
                      "sync_decay": 0.95, "sync_steps": 1, "sync_every": 1, "wrap": False, "window_batch": 2}
            if kind == "SYNCDIFF_ANCHOR":
                inputs["anchor"] = src
            out[f"c{slot}"] = {"class_type": "SyncDiffusionSampler", "inputs": inputs}
            out[f"c{slot}_show"] = {"class_type": "PreviewAny", "inputs": {"source": [f"c{slot}", 0]}}
        elif kind == "SAMPLER":
            out[f"c{slot}_noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
            out[f"c{slot}_guider"] = {"class_type": "CFGGuider", "inputs": {
                "model": ["p_ckpt", 0], "positive": ["p_pos", 0], "negative": ["p_neg", 0], "cfg": 5.0}}
            out[f"c{slot}_sigmas"] = {"class_type": "BasicScheduler", "inputs": {
                "model": ["p_ckpt", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}}
            out[f"c{slot}"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": [f"c{slot}_noise", 0], "guider": [f"c{slot}_guider", 0], "sampler": src,
                "sigmas": [f"c{slot}_sigmas", 0], "latent_image": ["p_lat", 0]}}
            out[f"c{slot}_show"] = {"class_type": "PreviewAny", "inputs": {"source": [f"c{slot}", 0]}}
        else:  # LATENT, MASK, FLOAT, STRING: shown as text
            out[f"c{slot}"] = {"class_type": "PreviewAny", "inputs": {"source": src}}
    return out


# ------------------------------------------------------------------------------------------------ values

CHEAP = {"steps": (1, 2), "sync_steps": (0, 1, 2), "compile": (False,), "padding": tuple(range(0, 65, 4))}
SIZES = (1, 7, 8, 16, 24, 32, 64, 65, 96, 128, 256, 512, 4096, 8192, 32768)
NOT_A_NUMBER = (None, "abc", "", [], {}, [1, 2], {"x": 1}, "1e3", "12", True)


def int_values(name: str, opts: dict):
    lo, hi = opts.get("min", -2**63), opts.get("max", 2**63)
    valid = list(CHEAP[name]) if name in CHEAP else \
        sorted({v for v in (lo, hi, lo + 1, hi - 1, *SIZES, opts.get("default", lo)) if lo <= v <= hi})
    bad = [lo - 1, hi + 1, -1, 2**64, -2**63, 10**30, 3.7, float("nan"), float("inf"), *NOT_A_NUMBER]
    step = opts.get("step", 1)
    small = [v for v in valid if v <= 64 and (v - lo) % step == 0] or valid  # sizes the small producers can run
    return st.one_of(st.sampled_from(small), st.sampled_from(valid)), st.sampled_from(bad)


def float_values(name: str, opts: dict):
    lo, hi = opts.get("min", -1e9), opts.get("max", 1e9)
    valid = st.one_of(st.sampled_from([lo, hi, opts.get("default", lo)]),
                      st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False))
    # NaN passes ComfyUI's range check (every comparison with NaN is false): the pack must refuse it itself
    bad = [float("nan"), float("nan"), float("inf"), -float("inf"), lo - 1e-3, hi + 1, 1e308, -1e308, "nan", "0.5",
           *NOT_A_NUMBER]
    return valid, st.sampled_from(bad)


def bool_values():
    return st.booleans(), st.sampled_from([0, 1, "false", "", None, [], 2])


def string_values():
    special = ["", "../../escape", "/etc/passwd_like", "a/b/c/deep", "pano_%batch_num%", "x" * 300, "nul\x00byte",
               "%date:yyyy-MM-dd%/p", "spaces and ünïcödé", "con", ".", "..", 12345, None]
    return st.one_of(st.sampled_from(["panorama360", "fuzz/pano"]), st.text(max_size=24)), st.sampled_from(special)


def combo_values(options: list):
    return st.sampled_from(options), st.sampled_from(["not-an-option", "", 0, None, str(options[0]).upper()])


def link_values(kind: str):
    right = LINKS.get(kind, [])
    wrong = [link for link in ALL_LINKS if link not in right]
    broken = [["no_such_node", 0], ["p_ckpt", 7], ["p_lat", -1], ["p_ckpt"], "p_ckpt", 0, None, {"a": 1}]
    bad = st.one_of(st.sampled_from(wrong), st.sampled_from(broken))
    return (st.sampled_from(right) if right else bad), bad


def values_for(name: str, spec: list):
    """(valid values, bad values) of one input, from its schema entry."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if kind == "COMBO" or isinstance(kind, list):
        return combo_values(opts.get("options") if kind == "COMBO" else kind)
    if kind == "INT":
        return int_values(name, opts)
    if kind == "FLOAT":
        return float_values(name, opts)
    if kind == "BOOLEAN":
        return bool_values()
    if kind == "STRING":
        return string_values()
    return link_values(kind)


MISSING = object()


def draw_prompt(data, node_id: str, info: dict, ckpt: str) -> tuple[dict, str]:
    """A prompt around ``node_id`` and the kind of case: 'valid' (every input valid for its schema, sizes up to the
    limits), 'one bad' (one input bad or missing, the rest valid), or 'random' (any input bad or missing)."""
    prompt = producers(ckpt)
    specs = {name: spec for section in ("required", "optional")
             for name, spec in info["input"].get(section, {}).items()}
    mode = data.draw(st.sampled_from(["valid", "one bad", "one bad", "random"]), label="mode")
    bad_one = data.draw(st.sampled_from(sorted(specs)), label="bad input") if mode == "one bad" and specs else None
    inputs = {}
    for name, spec in specs.items():
        valid, bad = values_for(name, spec)
        if mode == "random":
            value = data.draw(st.one_of(st.just(MISSING), valid, valid, valid, bad, bad), label=name)
        elif name == bad_one:
            value = data.draw(st.one_of(st.just(MISSING), bad, bad, bad), label=name)
        else:
            value = data.draw(valid, label=name)
        if value is not MISSING:
            inputs[name] = value
    prompt["t"] = {"class_type": node_id, "inputs": inputs}
    prompt.update(consumers("t", info["output"]))
    return prompt, mode


# ------------------------------------------------------------------------------------------------ the server

@pytest.fixture(scope="module")
def server(tmp_path_factory, comfy, tiny_sd15, lpips_trunk):
    from devtools import models as tiny_models

    base = tmp_path_factory.mktemp("fuzz_server")
    # a random VGG19 trunk too, so that PanoramaCoherence can finish
    tiny_models.write_random_trunk(base / "vgg19" / "vgg19.safetensors", "vgg19", seed=3)

    def list_vgg19(srv):
        with open(srv.base / "extra_model_paths.yaml", "a") as f:
            f.write(f"fuzz_extra:\n    base_path: {base}\n    lpips: vgg19\n")

    try:
        yield from running(base / "srv", comfy.models_dir, env=ONE_THREAD, before_start=list_vgg19)
    finally:
        summary = {"cases": sum(OUTCOMES.values()), "outcomes": dict(OUTCOMES), "by_mode": MODES,
                   "errors": dict(ERROR_KINDS),
                   "per_node": PER_NODE, "slowest_case_s": round(SLOWEST[0], 2), "slowest_case": SLOWEST[1]}
        print("\nfuzzed prompts:", json.dumps(summary, indent=1))
        if os.environ.get("SYNCDIFF_RELIABILITY_OUT"):
            with open(os.environ["SYNCDIFF_RELIABILITY_OUT"], "w") as f:
                json.dump(summary, f, indent=1)


@pytest.fixture(scope="module")
def schemas(server, comfy):
    info = get(server.url + "/object_info", timeout=60)
    return {nid: info[nid] for nid in comfy.pack_node_ids}


def _error_of(entry: dict) -> dict:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data
    return {}


def _check_files(server: Server, entry: dict | None):
    from PIL import Image

    leftovers = [p for p in server.output.rglob("*") if p.name.startswith(".syncdiff-")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    for out in (entry or {}).get("outputs", {}).values():
        for img in out.get("images", []):
            folder = server.output if img.get("type") == "output" else server.base / img.get("type", "temp")
            path = folder / img.get("subfolder", "") / img["filename"]
            with Image.open(path) as im:
                im.verify()  # a complete, readable file


def run_case(server: Server, prompt: dict) -> tuple[str, str]:
    """(outcome, detail) of one prompt: 'refused', 'error', or 'finished'. Fails on anything else."""
    try:
        body_text = json.dumps({"prompt": prompt, "client_id": server.client_id}, allow_nan=True)
    except (TypeError, ValueError) as e:  # pragma: no cover - the strategies only draw JSON values
        raise AssertionError(f"the fuzzer drew a value JSON cannot carry: {e}")
    status, body = post(server.url + "/prompt", None, raw=body_text.encode())
    if status == 400:
        assert isinstance(body, dict) and (body.get("error") or body.get("node_errors")), body
        return "refused", (body.get("error") or {}).get("type", "node_errors")
    assert status == 200, f"/prompt answered {status}: {body}"
    entry = server.wait(body["prompt_id"], CASE_TIMEOUT_S)
    if entry is None:
        server.interrupt()
        late = server.wait(body["prompt_id"], STOP_TIMEOUT_S)
        raise AssertionError(f"the prompt did not finish within {CASE_TIMEOUT_S} s (after Cancel: "
                             f"{'stopped' if late else 'still running'}):\n{json.dumps(prompt)[:3000]}")
    _check_files(server, entry)
    if entry["status"]["status_str"] == "success":
        return "finished", ""
    err = _error_of(entry)
    kind = err.get("exception_type", "?").rsplit(".", 1)[-1]
    message = err.get("exception_message", "")
    clear = kind in CLEAR_ERRORS or (kind == "Exception" and "outside the output folder" in message)
    assert clear and message.strip(), (
        f"node {err.get('node_type')} failed with {err.get('exception_type')}: {message}\n"
        f"{''.join(err.get('traceback', []))[-3000:]}\nprompt: {json.dumps(prompt)[:3000]}")
    return "error", f"{err.get('node_type')}: {kind}"


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_prompts_get_a_clear_answer(server, schemas, tiny_sd15, data):
    node_id = data.draw(st.sampled_from(sorted(schemas)), label="node")
    prompt, mode = draw_prompt(data, node_id, schemas[node_id], tiny_sd15.ckpt_name)
    t0 = time.monotonic()
    outcome, detail = run_case(server, prompt)
    seconds = time.monotonic() - t0
    if seconds > SLOWEST[0]:
        SLOWEST[:] = [seconds, f"{node_id} ({outcome} {detail})"]
    OUTCOMES[outcome] += 1
    MODES.setdefault(mode, Counter())[outcome] += 1
    if outcome == "error":
        ERROR_KINDS[detail] += 1
    PER_NODE.setdefault(node_id, Counter())[outcome] += 1
    assert server.alive(), f"the server died:\n{server.tail()}"
    assert server.queue_empty(), "the queue did not empty"
