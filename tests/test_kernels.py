"""Triton kernels against their PyTorch references. Without a GPU they run in Triton's interpreter on the CPU
(TRITON_INTERPRET=1, set here before any kernel is built); skipped with a reason when triton is not installed."""

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and Triton's interpreter was not enabled before triton was imported (tests/conftest.py "
                "sets TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (pip install triton numpy to run the kernel tests)")

from peftkit.kernels import kernels_enabled  # noqa: E402
from peftkit.kernels.lora_mixed import mixed_lora_add_triton  # noqa: E402
from peftkit.methods.lora import lora_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_stack(n, r_list, k_in, n_out, dtype, gen):
    """Rank-padded stacks as stacked_factors builds them: last entry zeros (no adapter)."""
    r_max = max(r_list)
    a = torch.zeros(n + 1, r_max, k_in, dtype=dtype)
    b = torch.zeros(n + 1, n_out, r_max, dtype=dtype)
    for i, r in enumerate(r_list):
        a[i, :r] = torch.randn(r, k_in, generator=gen).to(dtype)
        b[i, :, :r] = torch.randn(n_out, r, generator=gen).to(dtype)
    return a.to(DEVICE), b.to(DEVICE)


CASES = [
    # (batch, tokens, in, out, ranks) -- odd sizes, ranks 1-64, token counts around the 16/64 block edges
    (3, 1, 33, 70, [1, 3]),        # decode path, rank 1
    (4, 5, 129, 65, [8, 17, 2]),   # decode path (tokens < 16), odd sizes
    (2, 16, 64, 64, [16, 4]),      # first prefill size, exact block
    (5, 37, 70, 129, [64, 1, 33]), # prefill, masks at every block edge, rank 64
    (2, 65, 31, 17, [5]),          # > one 64-token block
]


@pytest.mark.parametrize("batch,tokens,k_in,n_out,ranks", CASES)
def test_mixed_lora_add_matches_reference(batch, tokens, k_in, n_out, ranks):
    gen = torch.Generator().manual_seed(batch * 100 + tokens)
    a, b = make_stack(len(ranks), ranks, k_in, n_out, torch.float32, gen)
    # every adapter and the "no adapter" entry appear; rows out of order
    index = torch.tensor([(i * 7 + 1) % (len(ranks) + 1) for i in range(batch)], device=DEVICE)
    x = torch.randn(batch, tokens, k_in, generator=gen).to(DEVICE)
    base = torch.randn(batch, tokens, n_out, generator=gen).to(DEVICE)
    want = lora_ops.mixed_lora_add(base.clone(), x, (a, b), index)
    got_buf = base.clone()
    got = mixed_lora_add_triton(got_buf, x, (a, b), index)
    assert got.data_ptr() == got_buf.data_ptr()  # in place
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    none_rows = index == len(ranks)
    assert torch.equal(got[none_rows], base[none_rows])  # rows without adapter untouched


def test_two_dim_input_and_non_contiguous_result():
    gen = torch.Generator().manual_seed(0)
    a, b = make_stack(3, [4, 8, 2], 40, 24, torch.float32, gen)
    index = torch.tensor([2, 0, 3, 1, 1], device=DEVICE)
    x = torch.randn(5, 40, generator=gen).to(DEVICE)  # (batch, in): one token per row
    base = torch.randn(24, 5, generator=gen).to(DEVICE).t()  # non-contiguous (batch, out)
    want = lora_ops.mixed_lora_add(base.clone(), x, (a, b), index)
    got = mixed_lora_add_triton(base.clone(), x, (a, b), index)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens", [3, 20])
def test_half_precision(tokens):
    gen = torch.Generator().manual_seed(tokens)
    a, b = make_stack(2, [8, 16], 48, 40, torch.float16, gen)
    index = torch.tensor([1, 0, 2], device=DEVICE)
    x = torch.randn(3, tokens, 48, generator=gen).to(DEVICE, torch.float16)
    base = torch.randn(3, tokens, 40, generator=gen).to(DEVICE, torch.float16)
    want = lora_ops.mixed_lora_add(base.float(), x.float(), (a.float(), b.float()), index)
    got = mixed_lora_add_triton(base.clone(), x, (a, b), index)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)


def test_shape_mismatch_is_refused():
    gen = torch.Generator().manual_seed(1)
    a, b = make_stack(2, [4, 4], 16, 8, torch.float32, gen)
    x = torch.randn(2, 3, 12, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        mixed_lora_add_triton(torch.zeros(2, 3, 8, device=DEVICE), x, (a, b), torch.tensor([0, 1], device=DEVICE))


def test_lora_layer_uses_kernel_for_mixed_batches(monkeypatch):
    """A LoRA model serving a mixed batch takes the kernel path (visible in fast_path) and gives the same
    logits as the PyTorch path."""
    import copy

    from models import MODELS

    import peftkit
    from peftkit import LoraConfig

    spec = MODELS["llama"]
    torch.manual_seed(0)
    model = peftkit.get_peft_model(spec.build(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model = model.to(DEVICE).eval()
    inputs = {k: v.to(DEVICE) for k, v in spec.inputs(3).items()}
    names = ["b", "__base__", "default"]
    if DEVICE == "cpu":
        assert not kernels_enabled(torch.device("cpu"))  # the interpreter alone does not reroute CPU layers
        monkeypatch.setenv("PEFTKIT_TRITON_CPU", "1")
    assert kernels_enabled(torch.device(DEVICE))
    with torch.no_grad():
        got = model(**inputs, adapter_names=names).logits
    paths = {m.fast_path for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "fast_path")}
    assert paths == {"triton-mixed"}, paths
    monkeypatch.setenv("PEFTKIT_DISABLE_TRITON", "1")
    with torch.no_grad():
        want = model(**inputs, adapter_names=names).logits
    paths = {m.fast_path for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "fast_path")}
    assert paths == {"stacked-mixed"}, paths
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- fused LoRA linear forward
from peftkit.kernels.lora_fused import lora_linear_forward  # noqa: E402


@pytest.mark.parametrize("m,k,n,r,bias", [(1, 16, 16, 1, True), (37, 70, 129, 17, False), (64, 64, 64, 64, True),
                                          (130, 33, 65, 8, True)])
def test_fused_forward_matches_reference(m, k, n, r, bias):
    gen = torch.Generator().manual_seed(m + k + n + r)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(DEVICE)
    bb = torch.randn(n, generator=gen).to(DEVICE) if bias else None
    a = torch.randn(r, k, generator=gen).to(DEVICE)
    b = torch.randn(n, r, generator=gen).to(DEVICE)
    h = x @ a.t()
    want = torch.nn.functional.linear(x, w, bb) + 0.5 * h @ b.t()
    got = lora_linear_forward(x, w, bb, h, b, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_fused_forward_half_and_transposed_weight():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 48, generator=gen).to(DEVICE, torch.float16)
    w = torch.randn(48, 40, generator=gen).to(DEVICE, torch.float16).t()  # fan_in_fan_out layout: strided view
    a = torch.randn(8, 48, generator=gen).to(DEVICE, torch.float16)
    b = torch.randn(40, 8, generator=gen).to(DEVICE, torch.float16)
    h = x @ a.t()
    want = x.float() @ w.float().t() + 2.0 * h.float() @ b.float().t()
    got = lora_linear_forward(x, w, None, h, b, 2.0)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-1)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_triton_node_outputs_and_gradients(monkeypatch, fan_in_fan_out):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 24, generator=gen).to(DEVICE)
    w = torch.randn(24, 31, generator=gen) if fan_in_fan_out else torch.randn(31, 24, generator=gen)
    w, bias = w.to(DEVICE), torch.randn(31, generator=gen).to(DEVICE)
    a = torch.randn(4, 24, generator=gen).to(DEVICE)
    b = torch.randn(31, 4, generator=gen).to(DEVICE)

    def run(path):
        leaves = [t.clone().requires_grad_(True) for t in (x, bias, a, b)]
        xx, bb, aa, bbb = leaves
        if path == "triton":
            monkeypatch.setenv("PEFTKIT_LORA_PATH", "triton")
            monkeypatch.setenv("PEFTKIT_TRITON_CPU", "1")
            assert lora_ops.triton_linear_enabled(xx)
        else:
            monkeypatch.delenv("PEFTKIT_LORA_PATH", raising=False)
        y = lora_ops.lora_linear(xx, w, bb, [(aa, bbb, 0.75)], fan_in_fan_out)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        return y.detach(), [t.grad for t in leaves]

    y_ref, g_ref = run("factored")
    y_tri, g_tri = run("triton")
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(g_tri, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_layer_takes_triton_path_when_asked(monkeypatch):
    from models import MODELS

    import peftkit
    from peftkit import LoraConfig

    spec = MODELS["llama"]
    torch.manual_seed(0)
    model = peftkit.get_peft_model(spec.build(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False)).to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in spec.inputs(2).items()}
    want = model(**inputs).logits
    monkeypatch.setenv("PEFTKIT_LORA_PATH", "triton")
    monkeypatch.setenv("PEFTKIT_TRITON_CPU", "1")
    got = model(**inputs).logits
    paths = {m.fast_path for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "fast_path")}
    assert paths == {"triton-lora"}, paths
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
