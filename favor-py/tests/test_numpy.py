"""favor's Python package on NumPy arrays: against a float64 NumPy FAVOR+, exact softmax,
finite differences, and every error path."""

import pathlib
import threading
import time

import numpy as np
import pytest

import favor
from reference import favor_attention, softmax_attention


def rand(seed, *shape, std=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def rel_err(got, want):
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / np.abs(want).max())


def qkv(b=2, h=4, hk=2, length=33, lk=None, d=16, dv=8, std=0.5):
    lk = length if lk is None else lk
    return rand(1, b, h, length, d, std=std), rand(2, b, hk, lk, d, std=std), rand(3, b, hk, lk, dv, std=1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_float64_reference(causal):
    q, k, v = qkv()
    out = favor.attention(q, k, v, causal=causal, num_features=64, seed=3)
    w = favor.draw_projection(64, 16, seed=3)
    assert out.shape == (2, 4, 33, 8) and out.dtype == np.float32 and out.flags.c_contiguous
    assert rel_err(out, favor_attention(q, k, v, w, causal)) < 1e-5


def test_cross_attention_mask_and_scale_match_the_reference():
    q, k, v = qkv(lk=20)
    mask = np.random.default_rng(4).random((2, 20)) > 0.3
    out = favor.attention(q, k, v, num_features=32, seed=1, key_mask=mask, scale=0.4)
    w = favor.draw_projection(32, 16, seed=1)
    assert rel_err(out, favor_attention(q, k, v, w, key_mask=mask, tau=0.4)) < 1e-5


def test_a_given_projection_equals_its_seed():
    q, k, v = qkv()
    w = favor.draw_projection(48, 16, seed=9)
    assert w.shape == (48, 16) and w.dtype == np.float32
    a = favor.attention(q, k, v, num_features=48, seed=9)
    b = favor.attention(q, k, v, projection=w)
    np.testing.assert_array_equal(a, b)
    iid = favor.draw_projection(48, 16, seed=9, orthogonal=False)
    assert not np.array_equal(iid, w)


def test_estimates_softmax_at_small_input_scale_and_improves_with_features():
    q, k, v = qkv(b=1, h=2, hk=2, length=128, d=16, std=0.3)
    exact = softmax_attention(q, k, v)
    errs = {m: rel_err(favor.attention(q, k, v, num_features=m, seed=0), exact) for m in (8, 1024)}
    assert errs[1024] < 0.05, errs
    assert errs[1024] < errs[8] / 3, errs


def test_gradients_match_finite_differences_of_the_reference():
    q, k, v = qkv(b=1, h=2, hk=1, length=7, d=4, dv=3)
    w = favor.draw_projection(6, 4, seed=2)
    dout = rand(5, 1, 2, 7, 3, std=1.0).astype(np.float64)
    for causal in (False, True):
        grads = favor.attention_backward(q, k, v, dout.astype(np.float32), causal=causal, projection=w)

        def loss(x, which):
            args = [q, k, v]
            args[which] = x
            return float((favor_attention(*args, w, causal) * dout).sum())

        for which, (x, g) in enumerate(zip((q, k, v), grads)):
            x = x.astype(np.float64)
            fd = np.zeros_like(x)
            for i in np.ndindex(x.shape):
                e = np.zeros_like(x)
                e[i] = 1e-5
                fd[i] = (loss(x + e, which) - loss(x - e, which)) / 2e-5
            assert rel_err(g, fd) < 1e-4, (causal, which)


def test_layouts_strides_and_dtypes_agree():
    q, k, v = qkv()
    want = favor.attention(q, k, v, causal=True)
    t = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    blhd = favor.attention(t(q), t(k), t(v), causal=True, layout="blhd")
    np.testing.assert_allclose(blhd.transpose(0, 2, 1, 3), want, rtol=0, atol=1e-6)
    # A transposed view is read through its strides, a negatively strided one through a copy.
    view = favor.attention(t(q).transpose(0, 2, 1, 3), k, v, causal=True)
    np.testing.assert_allclose(view, want, rtol=0, atol=1e-6)
    flipped = favor.attention(q[:, :, ::-1][:, :, ::-1], k, v, causal=True)
    np.testing.assert_allclose(flipped, want, rtol=0, atol=1e-6)
    half = favor.attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), causal=True)
    assert half.dtype == np.float16
    assert rel_err(half, want.astype(np.float64)) < 1e-2
    bits = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 by truncation
    bf = favor.attention(bits(q), bits(k), bits(v), causal=True)
    assert bf.dtype == np.uint16
    assert rel_err((bf.astype(np.uint32) << 16).view(np.float32), want.astype(np.float64)) < 3e-2


def test_backends_agree():
    ids = favor.backends()
    assert "reference" in ids and any(i.startswith("simd:") for i in ids)
    q, k, v = qkv()
    want = favor.attention(q, k, v, causal=True, backend="reference")
    for b in ids:
        assert rel_err(favor.attention(q, k, v, causal=True, backend=b), want.astype(np.float64)) < 1e-5, b


@pytest.mark.parametrize("name", favor.FEATURE_MAPS)
def test_every_feature_map_runs(name):
    q, k, v = qkv()
    for causal in (False, True):
        out = favor.attention(q, k, v, causal=causal, feature_map=name, num_features=32)
        assert np.isfinite(out).all()
        dq, dk, dv = favor.attention_backward(q, k, v, np.ones_like(out), causal=causal, feature_map=name, num_features=32)
        assert all(np.isfinite(g).all() for g in (dq, dk, dv))


def test_decoder_equals_causal_attention():
    q, k, v = qkv(b=3)
    want = favor.attention(q, k, v, causal=True, num_features=32, seed=5)
    dec = favor.Decoder(3, 4, 16, dv=8, kv_heads=2, num_features=32, seed=5)
    assert dec.slots == 3
    parts = [dec.decode(q[:, :, :20], k[:, :, :20], v[:, :, :20])]
    parts += [dec.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]) for t in range(20, 33)]
    np.testing.assert_allclose(np.concatenate(parts, axis=2), want, rtol=0, atol=1e-5)
    assert dec.tokens(2) == 33


def test_decoder_slots_save_load_reset_copy():
    q, k, v = qkv(b=1)
    dec = favor.Decoder(4, 4, 16, dv=8, kv_heads=2, num_features=32)
    tm = lambda x: np.ascontiguousarray(x[0].transpose(1, 0, 2))  # [tokens, heads, width]
    # Slot 2 gets 30 tokens, slot 0 three, in one call.
    packed = [np.concatenate([tm(x[:, :, :30]), tm(x[:, :, :3])]) for x in (q, k, v)]
    out = dec.decode_slots([2, 0], [30, 3], *packed)
    assert out.shape == (33, 4, 8)
    want = favor.attention(q, k, v, causal=True, num_features=32)
    np.testing.assert_allclose(out[:30], tm(want[:, :, :30]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[30:], tm(want[:, :, :3]), rtol=0, atol=1e-5)
    assert (dec.tokens(2), dec.tokens(0), dec.tokens(1)) == (30, 3, 0)
    saved = dec.save(2)
    dec.reset(2)
    assert dec.tokens(2) == 0
    dec.load(2, saved)
    dec.copy(2, 3)
    assert dec.tokens(3) == 30
    step = dec.decode_slots([2, 3], [1, 1], *[np.concatenate([tm(x[:, :, 30:31])] * 2) for x in (q, k, v)])
    np.testing.assert_allclose(step[0], tm(want[:, :, 30:31])[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(step[0], step[1])
    other = favor.Decoder(4, 4, 16, dv=8, kv_heads=2, num_features=32, seed=1)
    with pytest.raises(ValueError, match="state"):
        other.load(0, saved)
    with pytest.raises(ValueError, match="slot bytes"):
        dec.load(0, saved[:-1])
    with pytest.raises(ValueError, match="slot"):
        dec.reset(9)
    with pytest.raises(ValueError, match="decoder has"):
        dec.decode(q[:, :2], k, v)


def test_errors_raise_python_exceptions():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="numpy.ndarray"):
        favor.attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match="float64"):
        favor.attention(q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match="dtype"):
        favor.attention(q, k.astype(np.float16), v)
    with pytest.raises(ValueError, match="4 dimensions"):
        favor.attention(q[0], k, v)
    with pytest.raises(ValueError, match="layout"):
        favor.attention(q, k, v, layout="bshd")
    with pytest.raises(ValueError, match="feature_map"):
        favor.attention(q, k, v, feature_map="gaussian")
    with pytest.raises(ValueError, match="backend"):
        favor.attention(q, k, v, backend="tpu")
    with pytest.raises(RuntimeError, match="not available"):
        favor.attention(q, k, v, backend="cuda:7")
    with pytest.raises(ValueError, match="kv_heads"):
        favor.attention(q, k, v, kv_heads=3)
    with pytest.raises(ValueError, match="kv_heads"):
        favor.attention(q, np.concatenate([k, k[:, :1]], axis=1), np.concatenate([v, v[:, :1]], axis=1))
    nan = q.copy()
    nan[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        favor.attention(nan, k, v)
    _, k20, v20 = qkv(lk=20)
    with pytest.raises(ValueError, match="kv_len"):
        favor.attention(q, k20, v20, causal=True)
    with pytest.raises(ValueError, match="key_mask"):
        favor.attention(q, k, v, key_mask=np.ones((2, 5), dtype=bool))
    with pytest.raises(ValueError, match="projection"):
        favor.attention(q, k, v, projection=np.ones((8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="softmax_scale"):
        favor.attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="must be positive"):
        favor.attention(q, k, v, num_features=0)
    with pytest.raises(ValueError, match="shape"):
        favor.attention_backward(q, k, v, np.ones((2, 4, 33, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="last dimension"):
        favor._favor.forward(favor._backend("simd"), favor._map("positive", 8, 16, 0, True, None, None), q[..., ::2], k, v, np.empty((2, 4, 33, 8), np.float32), False, "bhld")


def test_outputs_may_not_alias_inputs():
    q, k, v = qkv(h=2, hk=2, d=8, dv=8)
    m = favor._map("positive", 8, 8, 0, True, None, None)
    with pytest.raises(ValueError, match="share memory"):
        favor._favor.forward(favor._backend("simd"), m, q, k, v, q, False, "bhld")


def test_the_gil_is_released_during_a_call():
    q, k, v = qkv(b=1, h=8, hk=8, length=32768, d=32, dv=32)
    window = {}

    def call():
        window["start"] = time.perf_counter()
        favor.attention(q, k, v, num_features=128)
        window["end"] = time.perf_counter()

    t = threading.Thread(target=call)
    ticks = []
    t.start()
    while t.is_alive():
        ticks.append(time.perf_counter())
    t.join()
    inside = [x for x in ticks if window["start"] < x < window["end"]]
    # With the GIL held for the whole call this thread could not run inside the window at all.
    assert window["end"] - window["start"] > 0.01
    assert len(inside) > 100, (len(inside), window["end"] - window["start"])


def test_the_readme_snippet_runs():
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(snippet, scope)
    assert scope["out"].shape == (1, 8, 1024, 64) and np.isfinite(scope["dq"]).all()


def test_out_is_written_in_place():
    q, k, v = qkv()
    want = favor.attention(q, k, v, causal=True)
    out = np.full((2, 4, 33, 8), np.nan, dtype=np.float32)
    assert favor.attention(q, k, v, causal=True, out=out) is out
    np.testing.assert_array_equal(out, want)
    with pytest.raises(TypeError, match="out"):
        favor.attention(q, k, v, out=out.astype(np.float16))
    strided = np.empty((2, 4, 33, 9), dtype=np.float32)[..., :8]
    favor.attention(q, k, v, causal=True, out=strided)
    np.testing.assert_array_equal(strided, want)
    with pytest.raises(ValueError, match="shape"):
        favor.attention(q, k, v, out=np.empty((2, 4, 32, 8), dtype=np.float32))
