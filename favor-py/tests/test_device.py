"""The device-tensor path (DeviceBackend, forward_device, backward_device) on the CUDA emulator,
whose "device" memory is host memory. It runs where the package was built with the emulator:

    pip install ./favor-py --config-settings=build-args="--features cuda-emulator"

and is skipped otherwise (the default build; favor.torch's CUDA test covers a real GPU)."""

import numpy as np
import pytest

import favor
from favor import _favor


def emulated():
    try:
        return _favor.DeviceBackend("cuda-emulated", 0)
    except (AttributeError, ValueError, RuntimeError):
        return None


pytestmark = pytest.mark.skipif(emulated() is None, reason="built without the CUDA emulator")


def described(a):
    return (a.ctypes.data, a.shape, tuple(s // a.itemsize for s in a.strides), str(a.dtype))


@pytest.mark.parametrize("causal", [False, True])
def test_device_calls_match_the_host(causal):
    dev = emulated()
    rng = np.random.default_rng(0)
    b, h, hk, length, d, dv = 2, 4, 2, 21, 16, 8
    q = (rng.standard_normal((b, h, length, d)) * 0.5).astype(np.float32)
    k = (rng.standard_normal((b, hk, length, d)) * 0.5).astype(np.float32)
    v = rng.standard_normal((b, hk, length, dv)).astype(np.float32)
    fmap = favor._map("positive", 32, d, 0, True, None, None)
    want = favor.attention(q, k, v, causal=causal, num_features=32, seed=0)
    out = np.zeros((b, h, length, dv), np.float32)
    _favor.forward_device(dev, fmap, described(q), described(k), described(v), described(out), causal, "bhld")
    dev.synchronize()
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    host = favor.attention_backward(q, k, v, dout, causal=causal, num_features=32, seed=0)
    grads = [np.zeros_like(x) for x in (q, k, v)]
    args = [described(x) for x in (q, k, v, dout, *grads)]
    _favor.backward_device(dev, fmap, *args, causal, "bhld")
    dev.synchronize()
    for g, w in zip(grads, host):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    t = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3))
    qt, kt, vt, ot = t(q), t(k), t(v), np.zeros((b, length, h, dv), np.float32)
    _favor.forward_device(dev, fmap, described(qt), described(kt), described(vt), described(ot), causal, "blhd")
    dev.synchronize()
    np.testing.assert_allclose(ot.transpose(0, 2, 1, 3), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="overlaps"):
        _favor.forward_device(dev, fmap, described(q), described(k), described(v), described(q[..., :dv]), causal, "bhld")
    with pytest.raises(TypeError, match="float64"):
        _favor.forward_device(dev, fmap, described(q.astype(np.float64)), described(k), described(v), described(out), causal, "bhld")
    with pytest.raises(ValueError, match="not a CUDA backend"):
        _favor.DeviceBackend("simd", 0)
