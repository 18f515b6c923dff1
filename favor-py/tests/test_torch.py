"""favor.torch: the autograd function and performer-pytorch's FastAttention signature (skipped
where torch is not installed)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import favor  # noqa: E402
from favor.torch import FastAttention, attention  # noqa: E402


def tensors(seed, b=2, h=4, length=29, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, h, length, d, generator=g) * 0.5).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_fast_attention_matches_numpy_and_backward(causal):
    q, k, v = tensors(0)
    attn = FastAttention(dim_heads=16, nb_features=32, causal=causal)
    out = attn(q, k, v)
    assert out.shape == (2, 4, 29, 16) and out.dtype == torch.float32
    w = attn.projection_matrix.numpy()
    a = [x.detach().numpy() for x in (q, k, v)]
    np.testing.assert_array_equal(out.detach().numpy(), favor.attention(*a, causal=causal, projection=w))
    dout = torch.randn_like(out)
    out.backward(dout)
    want = favor.attention_backward(*a, dout.numpy(), causal=causal, projection=w)
    for x, g in zip((q, k, v), want):
        np.testing.assert_array_equal(x.grad.numpy(), g)


def test_gradients_match_finite_differences():
    q, k, v = tensors(1, b=1, h=2, length=6, d=4)
    weights = torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(9))

    def loss(q, k, v):
        return (attention(q, k, v, causal=True, num_features=8) * weights).sum()

    loss(q, k, v).backward()
    for which, x in enumerate((q, k, v)):
        fd = torch.zeros_like(x)
        with torch.no_grad():
            for i in np.ndindex(tuple(x.shape)):
                args = [t.detach().clone() for t in (q, k, v)]
                args[which][i] += 1e-2
                plus = loss(*args)
                args[which][i] -= 2e-2
                fd[i] = (plus - loss(*args)) / 2e-2
        assert (x.grad - fd).abs().max() / fd.abs().max() < 2e-2, which


def test_bfloat16_and_module_options():
    q, k, v = tensors(2, dtype=torch.bfloat16)
    attn = FastAttention(dim_heads=16, nb_features=32)
    out = attn(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16
    before = attn.projection_matrix.clone()
    attn.redraw_projection_matrix()
    assert not torch.equal(before, attn.projection_matrix)
    assert FastAttention(16).nb_features == int(16 * np.log(16))
    relu = FastAttention(16, nb_features=8, generalized_attention=True)
    assert torch.isfinite(relu(*tensors(3))).all()
    elu = FastAttention(16, no_projection=True)
    assert torch.isfinite(elu(*tensors(4))).all()
    with pytest.raises(ValueError):
        FastAttention(16, ortho_scaling=1)
    with pytest.raises(TypeError):
        attn(*(t.double() for t in tensors(5)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_tensors_run_on_the_device_and_match_the_cpu(causal):
    q, k, v = tensors(6)
    attn = FastAttention(dim_heads=16, nb_features=32, causal=causal)
    want = attn(q, k, v)
    want.sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    qc, kc, vc = (x.detach().cuda().requires_grad_() for x in (q, k, v))
    got = attn.cuda()(qc, kc, vc)
    assert got.is_cuda
    got.sum().backward()
    torch.testing.assert_close(got.cpu(), want.detach(), rtol=0, atol=1e-4)
    for x, g in zip((qc, kc, vc), grads):
        torch.testing.assert_close(x.grad.cpu(), g, rtol=0, atol=1e-3)
