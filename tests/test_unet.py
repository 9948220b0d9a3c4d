"""The U-Net: sizes, conditioning, padding invariance, checkpointing, attention backends, bad input."""

import logging

import pytest
import torch
from torch import nn

from models import attention as attn_mod
from models import build_model, model_config
from models.attention import attention, naive_attention, select_backend
from models.norm_act import group_norm_silu


def _randomize(m: nn.Module, seed=0):
    """Break the zero-initialised output layers so that outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _cond(b=2, length=12, real=5, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :real] = True
    return {"tokens": torch.randn(b, length, dim, generator=g), "mask": mask, "pooled": torch.randn(b, dim, generator=g)}


def _tiny(**kw):
    return build_model("tiny", context_dim=64, pooled_dim=64, **kw)


@pytest.mark.parametrize("size, lo, hi", [("tiny", 1e6, 3e6), ("small", 90e6, 130e6), ("base", 350e6, 480e6), ("large", 0.9e9, 1.2e9)])
def test_every_size_builds_with_its_parameter_count(size, lo, hi):
    with torch.device("meta"):
        m = build_model(size)
    assert lo < m.num_parameters() < hi


@pytest.mark.parametrize("size, res", [("tiny", 32), ("small", 16)])
def test_small_sizes_run_forward(size, res):
    m = build_model(size).eval()
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        out = m(x, torch.tensor([0, 999]), _cond(dim=512))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer


def test_latent_inputs_and_unconditional():
    m = _randomize(_tiny(in_channels=4)).eval()
    out = m(torch.randn(2, 4, 16, 16), torch.tensor([5, 6]), None)
    assert out.shape == (2, 4, 16, 16)


def test_conditioning_matters_and_padding_does_not():
    m = _randomize(_tiny()).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([100, 500])
    c1, c2 = _cond(seed=1), _cond(seed=2)
    with torch.no_grad():
        o1, o2 = m(x, t, c1), m(x, t, c2)
        assert (o1 - o2).abs().max() > 1e-3
        # the same 5 real tokens padded to 12 and to 30 with different garbage: same output
        long = {"tokens": torch.cat([c1["tokens"][:, :5], torch.randn(2, 25, 64)], 1),
                "mask": torch.cat([c1["mask"][:, :5], torch.zeros(2, 25, dtype=torch.bool)], 1), "pooled": c1["pooled"]}
        torch.testing.assert_close(m(x, t, long), o1, atol=1e-5, rtol=1e-5)
        # the pooled embedding is used too
        p = dict(c1, pooled=torch.randn(2, 64))
        assert (m(x, t, p) - o1).abs().max() > 1e-4


def test_timestep_matters():
    m = _randomize(_tiny()).eval()
    x, c = torch.randn(1, 3, 16, 16), _cond(b=1)
    with torch.no_grad():
        assert (m(x, torch.tensor([10]), c) - m(x, torch.tensor([900]), c)).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    base = _randomize(_tiny(dropout=0.0))
    ck = _tiny(dropout=0.0, gradient_checkpointing=True)
    ck.load_state_dict(base.state_dict())
    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), _cond()
    grads = []
    for m in (base, ck):
        m.train()
        m.zero_grad()
        m(x, t, c).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_channels_last_gives_the_same_output_and_gradients():
    m = _randomize(_tiny())
    m2 = _tiny()
    m2.load_state_dict(m.state_dict())
    m2 = m2.to(memory_format=torch.channels_last)
    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), _cond()
    ref = m(x, t, c)
    out = m2(x.to(memory_format=torch.channels_last), t, c)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout survives the attention blocks
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.pow(2).sum().backward()
    out.pow(2).sum().backward()
    for a, b in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4)


def test_sdpa_equals_naive_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 20, 16, generator=g) for _ in range(3))
    k, v = k[:, :, :9], v[:, :, :9]
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 1:] = False
    for m in (None, mask):
        torch.testing.assert_close(attention(q, k, v, m, backend="sdpa"), naive_attention(q, k, v, m), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attention(q, k, v, m, backend="math"), naive_attention(q, k, v, m), atol=0, rtol=0)


def test_backend_selection(monkeypatch, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(attn_mod, "xformers_available", lambda: False)
    assert select_backend("auto", cpu) == "sdpa" and select_backend("auto", cuda) == "sdpa"
    with pytest.raises(RuntimeError, match="xformers"):
        select_backend("xformers", cpu)
    monkeypatch.setattr(attn_mod, "xformers_available", lambda: True)
    monkeypatch.setattr(attn_mod, "xformers_problem", lambda device: None)  # installed and working
    assert select_backend("auto", cuda) == "xformers"
    assert select_backend("auto", cpu) == "sdpa"  # xformers is CUDA-only
    monkeypatch.setattr(attn_mod, "xformers_problem", lambda device: "built for another PyTorch")
    assert select_backend("auto", cuda) == "sdpa"  # installed but broken: passed over …
    with pytest.raises(RuntimeError, match="does not run here .built for another PyTorch.*attention='auto'"):
        select_backend("xformers", cuda)  # … and refused by name, saying why
    with pytest.raises(ValueError, match="allowed values: auto, sdpa, xformers, math"):
        select_backend("flash3", cpu)
    # the choice is logged once
    monkeypatch.setattr(attn_mod, "_logged", set())
    with caplog.at_level(logging.INFO, logger="models.attention"):
        for _ in range(3):
            attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
    assert sum("attention backend" in r.message for r in caplog.records) == 1


class _FakeXformers:
    """Stands in for ``xformers.ops`` on a CPU: its documented contract (q, k, v as (B, L, H, d); a tensor bias
    (B, H, Lq, Lk) whose strides, but the last, are multiples of 8) and softmax(QKᵀ/√d + bias)V."""

    def __init__(self, fail=None):
        self.fail, self.calls = fail, 0

    def memory_efficient_attention(self, q, k, v, attn_bias=None):
        self.calls += 1
        if self.fail:
            raise NotImplementedError(self.fail)
        if attn_bias is not None:
            assert all(st % 8 == 0 for st in attn_bias.stride()[:-1]), attn_bias.stride()
            assert attn_bias.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        w = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / q.shape[-1] ** 0.5
        return ((w if attn_bias is None else w + attn_bias).softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)


def _fake_xformers(monkeypatch, fake):
    import sys
    import types

    pkg = types.ModuleType("xformers")
    pkg.ops = fake
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    monkeypatch.setattr(attn_mod, "_xformers_works", {})


def test_xformers_probe_passes_over_a_broken_install(monkeypatch, caplog):
    """An xformers whose kernels do not load is tried once per device, warned about once, and remembered."""
    fake = _FakeXformers(fail="No operator found for `memory_efficient_attention_forward`")
    _fake_xformers(monkeypatch, fake)
    cpu = torch.device("cpu")  # the probe's logic; on a GPU, tests/test_gpu.py runs the real thing
    with caplog.at_level(logging.WARNING, logger="models.attention"):
        assert "No operator found" in attn_mod.xformers_problem(cpu)
        assert "No operator found" in attn_mod.xformers_problem(cpu)
    assert fake.calls == 1 and sum("does not run" in r.message for r in caplog.records) == 1
    _fake_xformers(monkeypatch, _FakeXformers())
    assert attn_mod.xformers_problem(cpu) is None


@pytest.mark.parametrize("lk", [77, 9, 16])
def test_xformers_path_builds_an_aligned_padding_bias(monkeypatch, lk):
    """Text padding reaches xformers as an additive bias with 8-aligned rows (77 tokens are not a multiple of 8:
    xformers refuses a plain (…, 77) tensor); the result equals the naive masked attention."""
    _fake_xformers(monkeypatch, _FakeXformers())
    monkeypatch.setattr(attn_mod, "select_backend", lambda requested, device: "xformers")
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, lk, 8, generator=g), torch.randn(2, 3, lk, 8, generator=g)
    mask = torch.arange(lk)[None].expand(2, -1) < torch.tensor([[5], [lk]])
    for m in (None, mask):
        torch.testing.assert_close(attention(q, k, v, m, backend="xformers"), naive_attention(q, k, v, m),
                                   atol=1e-5, rtol=1e-5)


def test_bad_resolution_says_what_is_expected():
    m = _tiny()
    with pytest.raises(ValueError, match=r"multiples of 4"):
        m(torch.randn(1, 3, 18, 18), torch.tensor([0]), None)


def test_unknown_size_and_keys():
    with pytest.raises(ValueError, match="unknown model size .huge.; allowed values: tiny, small, base, large, sd, sd2"):
        build_model("huge")
    with pytest.raises(ValueError, match="unknown U-Net config keys"):
        model_config("tiny", depth=3)
    with pytest.raises(ValueError, match="attention_levels"):
        model_config("tiny", attention_levels=(5,))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_group_norm_silu_matches_autograd(channels_last, scale_shift):
    """The memory-lean GN → scale-shift → SiLU node: same values and gradients as autograd's composition."""
    g = torch.Generator().manual_seed(0)
    norm = nn.GroupNorm(4, 16).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g, dtype=torch.float64))
        norm.bias.copy_(torch.randn(16, generator=g, dtype=torch.float64))
    x = torch.randn(3, 16, 5, 6, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ss = [torch.randn(3, 16, 1, 1, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)] if scale_shift else []
    out = group_norm_silu(x, norm, *ss)
    ref = torch.nn.functional.silu(norm(x) * (1 + ss[0]) + ss[1] if ss else norm(x))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)  # computed in NCHW, returned in the input's layout
    inputs = [x, norm.weight, norm.bias, *ss]
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got, want = torch.autograd.grad(out, inputs, gy), torch.autograd.grad(ref, inputs, gy)
    assert got[0].is_contiguous(memory_format=fmt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x, *s: group_norm_silu(x, norm, *s), (x, *ss))


def test_group_norm_silu_saves_only_its_input():
    """The point of the fused node: the normalised and scale-shifted tensors are not kept for backward."""
    norm = nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    scale, shift = torch.randn(2, 16, 1, 1, requires_grad=True), torch.randn(2, 16, 1, 1, requires_grad=True)

    def saved_full_size(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return sum(1 for s in sizes if s == x.numel())

    assert saved_full_size(lambda: group_norm_silu(x, norm, scale, shift)) == 1  # x only
    assert saved_full_size(lambda: torch.nn.functional.silu(torch.addcmul(shift, norm(x), 1 + scale))) >= 3


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_saves_its_input_itself(channels_last):
    """x is saved as given (not an NCHW copy of a channels_last x): it is usually kept anyway as a skip connection's
    or a convolution's input, so a copy would double it."""
    norm = nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        group_norm_silu(x, norm)
    assert any(t is x for t in saved)
    assert sum(1 for t in saved if t.numel() == x.numel()) == 1


def test_caption_tokens_are_cast_once_under_autocast():
    """Under autocast the caption tokens (B, L, context_dim) are cast to bf16 once per forward, not once per
    attention block (autocast caches the casts of parameters, not of activations)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m, c = _tiny(), _cond(b=2, length=12, dim=64)
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == c["tokens"].shape:
                casts.append(kwargs.get("dtype"))
            return func(*args, **(kwargs or {}))

    assert sum(isinstance(b, type(m.middle[1])) for b in m.modules()) > 1  # several attention blocks read them
    with Casts(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), c)
    assert casts == [torch.bfloat16]


def test_bf16_autocast_training_step_is_close_to_fp32():
    """CPU bf16 autocast (AMX where present): output and gradients follow fp32 to bf16 precision."""
    m = _randomize(_tiny())
    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), _cond()
    grads, outs = [], []
    for bf16 in (False, True):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(x, t, c)
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        out.float().pow(2).mean().backward()
        outs.append(out.float())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(outs[1], outs[0]) < 0.03
    assert rel(grads[1], grads[0]) < 0.05


@pytest.mark.parametrize("base", [40, 72])
def test_any_base_width_builds_and_runs(base):
    """GroupNorm takes the most groups (≤ 32) that divide each width, so widths like 72 (144, 216, …) work."""
    m = build_model("tiny", base_channels=base, head_channels=base, context_dim=64, pooled_dim=64)
    assert m(torch.randn(1, 3, 16, 16), torch.tensor([5]), _cond(b=1)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_upcast_path_matches_the_mixed_precision_kernel(channels_last):
    """Off a CPU, low-precision inputs are upcast inside the node; on a CPU the mixed bf16/fp32 kernel is used.
    Both paths (run here on a CPU, in both layouts) follow the fp32 composition to bf16 precision."""
    from models.norm_act import _apply

    g = torch.Generator().manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x0 = torch.randn(2, 16, 6, 6, generator=g).bfloat16().contiguous(memory_format=fmt)
    ss0 = [torch.randn(2, 16, 1, 1, generator=g) for _ in range(2)]
    results = []
    for path in (False, True, "fp32 autograd"):
        x = x0.clone().requires_grad_()
        ss = [s.clone().requires_grad_() for s in ss0]
        norm.zero_grad()
        if path == "fp32 autograd":
            out = torch.nn.functional.silu(torch.addcmul(ss[1], norm(x.float()), 1 + ss[0]))
        else:
            out = _apply(x, norm, *ss, upcast=path)
            assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=fmt)
        out.float().pow(2).sum().backward()
        results.append([out.float(), x.grad.float(), norm.weight.grad, norm.bias.grad, *(s.grad for s in ss)])
    for got in results[:2]:
        for a, b in zip(got, results[2]):  # bf16 rounding differs element-wise; compare as tensors
            assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_group_norm_silu_refuses_a_norm_without_affine():
    with pytest.raises(ValueError, match="affine=True"):
        group_norm_silu(torch.randn(1, 4, 2, 2), nn.GroupNorm(2, 4, affine=False))


@pytest.mark.parametrize("bf16, checkpointing", [(False, False), (True, False), (False, True)])
def test_compiles_as_one_graph_with_the_same_output_and_gradients(bf16, checkpointing, monkeypatch):
    """torch.compile (train.compile): no graph breaks (fullgraph), and the traced model — plain GroupNorm ops in place
    of the fused node, the CPU attention node under bf16, checkpointed blocks — gives eager's output and gradients.
    ``aot_eager`` traces forward and backward as inductor does, without generating code (inductor itself runs in
    tests/test_train.py)."""
    torch._dynamo.reset()
    m = _randomize(_tiny(gradient_checkpointing=checkpointing))
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), _cond()
    outs, grads = [], []
    for model in (m, compiled):
        m.zero_grad()
        monkeypatch.setattr(attn_mod, "_logged", set())  # the backend log must not break the graph either
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, c)
        out.float().pow(2).mean().backward()
        outs.append(out.float())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    torch.testing.assert_close(grads[1], grads[0], **tol)
    assert list(m.state_dict()) == list(compiled._orig_mod.state_dict())
