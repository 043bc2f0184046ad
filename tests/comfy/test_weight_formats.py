"""Synchronization with weights as users load them: fp8 (e4m3fn) storage cast per layer by ComfyUI's manual cast
(what UNETLoader's ``weight_dtype`` fp8 and fp8 checkpoints give), and ComfyUI's own quantized tensors where the
running ComfyUI has them. The loaded weights must come back bit for bit, and no quantized weight is copied whole.
"""
import types

import pytest
import torch

from test_sync_comfy import H, W, job, run


def fp8_copy(tiny):
    """The tiny model's UNet with float8_e4m3fn storage and float32 compute (ComfyUI's manual cast ops), built
    under inference mode as a loader builds it."""
    import comfy.model_management as mm
    import comfy.model_patcher

    cfg = tiny.model.model.model_config
    with torch.inference_mode():
        mc = type(cfg)(dict(cfg.unet_config))
        mc.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
        model = mc.get_model({})
        model.diffusion_model.load_state_dict(tiny.model.model.diffusion_model.state_dict())
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
    return types.SimpleNamespace(model=patcher, positive=tiny.positive, negative=tiny.negative)


def raw_bytes(module: torch.nn.Module) -> dict:
    return {k: v.detach().view(torch.uint8).clone() if v.dtype.itemsize == 1 else v.detach().clone()
            for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_fp8_weights_synchronize_and_stay_bit_identical(comfy, pack, micro, tiny_kl_vae, lpips):
    fp8 = fp8_copy(micro)
    unet = fp8.model.model.diffusion_model
    assert any(p.dtype == torch.float8_e4m3fn for p in unet.parameters())
    before = raw_bytes(unet)
    synced = run(pack, fp8, tiny_kl_vae, job(pack, steps=2, w=20.0, sync_steps=1), loss=lpips)
    plain = run(pack, fp8, tiny_kl_vae, job(pack, steps=2))
    assert synced.shape == (1, 4, H, W) and bool(torch.isfinite(synced).all())
    assert float((synced - plain).abs().max()) > 1e-4  # the sync step moved the windows
    after = raw_bytes(unet)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float8_e4m3fn for n, p in unet.named_parameters() if before[n].dtype == torch.uint8)


def test_trainable_weights_never_copy_a_quantized_tensor(comfy, pack):
    """ComfyUI's quantized weights (a wrapper tensor subclass) get a stand-in over their own inner tensors' memory,
    never a copy of the quantized model."""
    quant_ops = pytest.importorskip("comfy.quant_ops")
    if not getattr(quant_ops, "_CK_AVAILABLE", False):
        pytest.skip("this ComfyUI has no quantized tensors (comfy-kitchen)")
    with torch.inference_mode():
        layer = torch.nn.Linear(8, 8)
        q = quant_ops.QuantizedTensor.from_float(layer.weight.float(), "TensorCoreFP8E4M3Layout")
        layer.weight = torch.nn.Parameter(q, requires_grad=False)
    original = layer.weight
    names, _ = original.__tensor_flatten__()
    x = torch.randn(2, 8, requires_grad=True)
    with pack.weights.trainable_weights(layer), torch.enable_grad():
        inside = layer.weight
        assert inside is not original and type(inside) is type(original) and not inside.is_inference()
        assert inside.__tensor_flatten__()[0] == names  # (flattening exposes the inner tensors as attributes)
        for name in names:  # normal tensors; the quantized values themselves not copied (a scalar scale may be)
            assert not getattr(inside, name).is_inference(), name
            if getattr(original, name).numel() == original.numel():
                assert getattr(inside, name).data_ptr() == getattr(original, name).data_ptr(), name
        (grad,) = torch.autograd.grad(torch.nn.functional.linear(x, inside.dequantize()).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert layer.weight is original


def test_comfyuis_quantized_weights_synchronize(comfy, pack, micro, tiny_kl_vae, lpips):
    """Where this ComfyUI has quantized tensors (``comfy.quant_ops.QuantizedTensor``, with comfy-kitchen), a model
    whose linear weights are quantized to fp8 synchronizes, and its weights are left untouched."""
    quant_ops = pytest.importorskip("comfy.quant_ops")
    layout = getattr(quant_ops, "TensorCoreFP8E4M3Layout", None)
    if not getattr(quant_ops, "_CK_AVAILABLE", False) or layout is None:
        pytest.skip("this ComfyUI has no fp8 quantized tensors (comfy-kitchen)")
    fp8 = fp8_copy(micro)
    unet = fp8.model.model.diffusion_model
    quantized = 0
    with torch.inference_mode():
        for module in unet.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float8_e4m3fn:
                q = quant_ops.QuantizedTensor.from_float(module.weight.float(), "TensorCoreFP8E4M3Layout")
                module.weight = torch.nn.Parameter(q, requires_grad=False)
                quantized += 1
    if not quantized:
        pytest.skip("no linear layer to quantize")
    ids = {n: id(p) for n, p in unet.named_parameters()}
    try:
        synced = run(pack, fp8, tiny_kl_vae, job(pack, steps=1, w=20.0, sync_steps=1), loss=lpips)
    except (NotImplementedError, RuntimeError) as e:  # a ComfyUI whose quantized ops cannot run on this CPU
        if "quant" not in str(e).lower() and "kitchen" not in str(e).lower():
            raise
        pytest.skip(f"ComfyUI's quantized ops do not run here: {e}")
    assert bool(torch.isfinite(synced).all())
    assert {n: id(p) for n, p in unet.named_parameters()} == ids
