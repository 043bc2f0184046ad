"""``syncdiff_core.gradients`` and ``syncdiff_core.comfy.autograd_patches.frozen_closure`` on plain-torch toys
(no ComfyUI models): the in-place pattern of ComfyUI's Flux blocks, checked against a functional twin."""
import pytest
import torch

from syncdiff_core import gradients as G


def block(x, y=None):
    """Flux's pattern: a norm saves x, then x is updated in place (twice); ``y`` (no grad) is updated too."""
    n = torch.nn.functional.layer_norm(x, x.shape[-1:])
    x += torch.tanh(n) * 0.5
    if y is not None:
        y += x.sum(-1, keepdim=True) * 0.1  # like Flux's txt stream: a no-grad input made part of the graph
        x = x * torch.sigmoid(y)
    n2 = torch.nn.functional.layer_norm(x, x.shape[-1:])
    x += torch.sin(n2)
    return x, y


def functional(x, y=None):
    n = torch.nn.functional.layer_norm(x, x.shape[-1:])
    x = x + torch.tanh(n) * 0.5
    if y is not None:
        y = y + x.sum(-1, keepdim=True) * 0.1
        x = x * torch.sigmoid(y)
    n2 = torch.nn.functional.layer_norm(x, x.shape[-1:])
    return x + torch.sin(n2), y


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    y = torch.randn(3, 1, generator=g, dtype=torch.float64)
    w = torch.randn(3, 8, generator=g, dtype=torch.float64)
    return x, y, w


def reference_grad(x, y, w):
    u = x.clone().requires_grad_(True)
    return torch.autograd.grad((functional(u * 1.0, y.clone())[0] * w).sum(), u)[0]


def test_plain_autograd_refuses_the_pattern(data):
    x, y, w = data
    u = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad((block(u * 1.0)[0] * w).sum(), u)


def test_identity_hooks_would_be_silently_wrong(data):
    """Why the copies: saved-tensor hooks switch autograd's version check off."""
    x, y, w = data
    u = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = block(u * 1.0)[0]
    wrong = torch.autograd.grad((out * w).sum(), u)[0]
    assert (wrong - reference_grad(x, y, w)).abs().max() > 1e-2


def test_saved_activation_copies_give_the_exact_gradient(data):
    x, y, w = data
    u = x.clone().requires_grad_(True)
    stats = G.CopyStats()
    with G.saved_activation_copies(stats):
        out = block(u * 1.0, y.clone())[0]
    grad = torch.autograd.grad((out * w).sum(), u)[0]
    u2 = x.clone().requires_grad_(True)
    ref = torch.autograd.grad((functional(u2 * 1.0, y.clone())[0] * w).sum(), u2)[0]
    assert torch.allclose(grad, ref, rtol=0, atol=1e-12)
    assert stats.copies > 0


def test_copies_are_shared_by_ops_saving_one_tensor():
    x = torch.randn(4, 4, requires_grad=True)
    stats = G.CopyStats()
    with G.saved_activation_copies(stats):
        h = x * 2
        a, b = torch.exp(h.sin() * h), (h * h).sum()  # h is saved by several ops, unchanged in between
    assert stats.copies < 6
    torch.autograd.grad(a.sum() + b, x)


def test_modified_constant_fails_loudly(data):
    x, _, w = data
    u = x.clone().requires_grad_(True)
    const = torch.ones(8, dtype=torch.float64)
    with G.saved_activation_copies():
        out = u * const  # const (no grad) is kept by reference
    const.add_(1.0)
    with pytest.raises(G.SavedTensorModifiedError, match="modified in place"):
        torch.autograd.grad((out * w).sum(), u)


@pytest.mark.parametrize("with_y", [False, True])
def test_recompute_gives_the_exact_gradient(data, with_y):
    """Including a no-grad input the block updates in place (the bug this guards against: the kept input changed
    in the forward, so the recompute saw other values)."""
    x, y, w = data
    u = x.clone().requires_grad_(True)
    yy = y.clone() if with_y else None
    ins = (u * 1.0, yy) if with_y else (u * 1.0,)
    out = G.recompute(lambda *t: block(*t) if with_y else (block(t[0])[0],), *ins)[0]
    grad = torch.autograd.grad((out * w).sum(), u)[0]
    u2 = x.clone().requires_grad_(True)
    ref = torch.autograd.grad((functional(u2 * 1.0, y.clone() if with_y else None)[0] * w).sum(), u2)[0]
    assert torch.allclose(grad, ref, rtol=0, atol=1e-12)
    if with_y:
        assert torch.equal(yy, y)  # the caller's tensors are not updated by the checkpointed function


def test_recompute_without_gradient_is_a_plain_call(data):
    x, y, _ = data
    calls = []

    def fn(t):
        calls.append(torch.is_grad_enabled())
        return (t * 2,)

    with torch.no_grad():
        (out,) = G.recompute(fn, x.clone().requires_grad_(True))
    assert calls == [False] and not out.requires_grad


def test_torch_checkpoint_cannot_replace_recompute(data):
    """Documents torch: non-reentrant checkpoint refuses the pattern, reentrant refuses autograd.grad."""
    from torch.utils.checkpoint import checkpoint
    x, _, w = data
    u = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad((checkpoint(lambda t: block(t)[0], u * 1.0, use_reentrant=False) * w).sum(), u)
    with pytest.raises(RuntimeError):
        torch.autograd.grad((checkpoint(lambda t: block(t)[0], u * 1.0, use_reentrant=True) * w).sum(), u)


def test_inference_tensors_usable():
    with torch.inference_mode():
        mean, std = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1), torch.tensor([2.0, 3.0]).view(1, 2, 1, 1)
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
        torch.autograd.grad((x * std.to(x) + mean).sum(), x)
    with G.inference_tensors_usable():
        out = x * std.to(x) + mean
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, std.expand_as(x))
    assert mean.is_inference() and torch.equal(mean.flatten(), torch.tensor([0.5, -1.0]))
    with G.inference_tensors_usable(), pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        std.mul_(2.0)  # in-place ops get no alias: still refused (torch itself writes before it raises)
    alias = G.normal_alias(std)
    assert not alias.is_inference() and alias.data_ptr() == std.data_ptr()  # no copy


def test_frozen_closure_keeps_the_loop_value():
    from syncdiff_core.comfy.autograd_patches import frozen_closure
    late, frozen = [], []
    for i in range(3):
        def wrap():
            return i
        late.append(wrap)
        frozen.append(frozen_closure(wrap))
    assert [f() for f in late] == [2, 2, 2]  # Python closures read the loop variable when called
    assert [f() for f in frozen] == [0, 1, 2]
