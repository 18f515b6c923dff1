"""favor: FAVOR+ (Performer) attention on favor's fastest backend here.

    import favor
    out = favor.attention(q, k, v, causal=False, num_features=256, seed=0)

q, k and v are NumPy arrays of float32 or float16 (uint16 arrays hold bfloat16 bits), laid out
[batch, heads, len, d] ("bhld", the default) or [batch, len, heads, d] ("blhd"). Arrays whose
last axis is contiguous are read in place through their strides, without a copy; the result is a
new C-contiguous array. Grouped key/value heads and cross-attention follow from k's shape. The
GIL is released while favor computes. favor's errors raise ValueError (shapes, strides,
parameters, non-finite values), TypeError (element types) or RuntimeError (a backend that
cannot run here).
"""

import functools

import numpy as np

from . import _favor

__all__ = ["attention", "attention_backward", "backends", "draw_projection", "Decoder", "FEATURE_MAPS"]

FEATURE_MAPS = ("positive", "hyperbolic", "trigonometric", "relu", "elu")
_LAYOUTS = {"bhld": (1, 2), "blhd": (2, 1)}  # (heads axis, len axis)


def backends():
    """The ids of the backends that run here, fastest first ("cuda:0", "simd:avx512", ...)."""
    return _favor.available_backends()


@functools.lru_cache(maxsize=16)
def _backend(name):
    return _favor.Backend(name)


@functools.lru_cache(maxsize=32)
def _drawn_map(kind, m, d, seed, orthogonal, scale):
    return _favor.FeatureMap.draw(kind, m, d, seed, orthogonal, scale)


def _map(feature_map, num_features, d, seed, orthogonal, scale, projection):
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {', '.join(FEATURE_MAPS)}; got {feature_map!r}")
    scale = None if scale is None else float(scale)
    if projection is not None:
        w = np.ascontiguousarray(projection, dtype=np.float32)
        if w.ndim != 2 or w.shape[1] != d:
            raise ValueError(f"projection must have shape [num_features, {d}], got {list(w.shape)}")
        return _favor.FeatureMap.from_matrix(feature_map, w, scale)
    return _drawn_map(feature_map, int(num_features), int(d), int(seed), bool(orthogonal), scale)


def draw_projection(num_features, d, seed=0, orthogonal=True):
    """The projection W ([num_features, d], float32) that `attention(..., seed=seed)` uses."""
    return _favor.FeatureMap.draw("positive", int(num_features), int(d), int(seed), bool(orthogonal), None).matrix()


def _array(name, x):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"`{name}` must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float16, np.uint16):
        raise TypeError(f"`{name}` must be float32, float16 or uint16 (bfloat16 bits), got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"`{name}` must have 4 dimensions, got shape {list(x.shape)}")
    # Read in place unless the last axis is strided, a stride is negative or the data is
    # misaligned; then one contiguous copy.
    inner_ok = x.shape[3] <= 1 or x.strides[3] == x.itemsize
    if not inner_ok or min(x.strides) < 0 or x.ctypes.data % x.itemsize:
        x = np.ascontiguousarray(x)
    return x


def _layout(layout):
    if layout not in _LAYOUTS:
        raise ValueError(f'layout must be "bhld" or "blhd", got {layout!r}')
    return _LAYOUTS[layout]


def _mask(key_mask, k, layout):
    if key_mask is None:
        return None
    m = np.ascontiguousarray(key_mask, dtype=bool)
    kv_len = k.shape[_LAYOUTS[layout][1]]
    if m.shape != (k.shape[0], kv_len):
        raise ValueError(f"key_mask must have shape [batch, kv_len] = {[k.shape[0], kv_len]}, got {list(m.shape)}")
    return m


def _check_kv_heads(kv_heads, k, layout):
    if kv_heads is not None and k.shape[_LAYOUTS[layout][0]] != kv_heads:
        raise ValueError(f"kv_heads = {kv_heads} but k has {k.shape[_LAYOUTS[layout][0]]} heads")


def _prepare(q, k, v, layout, kv_heads, feature_map, num_features, seed, orthogonal, scale, projection, backend):
    _layout(layout)
    q, k, v = _array("q", q), _array("k", k), _array("v", v)
    _check_kv_heads(kv_heads, k, layout)
    fmap = _map(feature_map, num_features, q.shape[3], seed, orthogonal, scale, projection)
    return q, k, v, fmap, _backend(backend)


def attention(
    q,
    k,
    v,
    causal=False,
    num_features=256,
    seed=0,
    *,
    feature_map="positive",
    layout="bhld",
    kv_heads=None,
    scale=None,
    key_mask=None,
    projection=None,
    orthogonal=True,
    backend="best",
    out=None,
):
    """FAVOR+ attention: softmax(q kᵀ·scale) v estimated with `num_features` random features.

    q: [batch, heads, len, d]; k: [batch, kv_heads, kv_len, d]; v: [batch, kv_heads, kv_len, dv]
    (or the "blhd" order of each). `scale` is the softmax temperature (default 1/√d);
    `projection` a W of shape [num_features, d] to use instead of drawing one from `seed`;
    `key_mask` a [batch, kv_len] boolean array (True = keep). Returns [batch, heads, len, dv]
    (or "blhd") of q's dtype: a new array, or `out` (an array of that shape and dtype whose last
    axis is contiguous), written in place, which spares repeated calls the new array's memory.
    """
    q, k, v, fmap, be = _prepare(q, k, v, layout, kv_heads, feature_map, num_features, seed, orthogonal, scale, projection, backend)
    shape = list(q.shape)
    shape[3] = v.shape[3]
    if out is None:
        out = np.empty(shape, dtype=q.dtype)
    elif not isinstance(out, np.ndarray) or out.dtype != q.dtype:
        raise TypeError(f"`out` must be a numpy.ndarray of q's dtype {q.dtype}")
    _favor.forward(be, fmap, q, k, v, out, bool(causal), layout, _mask(key_mask, k, layout))
    return out


def attention_backward(
    q,
    k,
    v,
    dout,
    causal=False,
    num_features=256,
    seed=0,
    *,
    feature_map="positive",
    layout="bhld",
    kv_heads=None,
    scale=None,
    key_mask=None,
    projection=None,
    orthogonal=True,
    backend="best",
):
    """Gradients (dq, dk, dv) of `attention` with the same arguments, given ∂L/∂out."""
    q, k, v, fmap, be = _prepare(q, k, v, layout, kv_heads, feature_map, num_features, seed, orthogonal, scale, projection, backend)
    dout = _array("dout", dout)
    dq, dk, dv = (np.empty(x.shape, dtype=x.dtype) for x in (q, k, v))
    _favor.backward(be, fmap, q, k, v, dout, dq, dk, dv, bool(causal), layout, _mask(key_mask, k, layout))
    return dq, dk, dv


class Decoder:
    """Causal decoding of many independent sequences ("slots") at their own positions.

    `decode` continues every slot by one chunk (arrays [slots, heads, len, d]); `decode_slots`
    continues some slots, each by its own number of tokens, packed token-major
    (q [tokens, heads, d]). Outputs equal full causal attention over everything a slot consumed.
    """

    def __init__(
        self,
        slots,
        heads,
        d,
        *,
        dv=None,
        kv_heads=None,
        num_features=256,
        seed=0,
        feature_map="positive",
        scale=None,
        projection=None,
        orthogonal=True,
        backend="best",
    ):
        self._map = _map(feature_map, num_features, d, seed, orthogonal, scale, projection)
        self._heads, self._kv_heads, self._d = heads, kv_heads or heads, d
        self._dv = dv or d
        self._state = _favor.SlotState(_backend(backend), self._map, slots, heads, self._kv_heads, d, self._dv)

    @property
    def slots(self):
        return self._state.slots

    def decode(self, q, k, v, layout="bhld"):
        """Continues every slot by the same number of tokens: q [slots, heads, len, d]."""
        _layout(layout)
        q, k, v = _array("q", q), _array("k", k), _array("v", v)
        shape = list(q.shape)
        shape[3] = self._dv
        out = np.empty(shape, dtype=q.dtype)
        self._state.decode(q, k, v, out, layout)
        return out

    def decode_slots(self, slots, lengths, q, k, v):
        """Continues slot slots[i] by lengths[i] tokens; q [sum(lengths), heads, d], k and v
        [sum(lengths), kv_heads, ·]. Returns [sum(lengths), heads, dv]."""
        slots = np.ascontiguousarray(slots, dtype=np.uintp)
        lengths = np.asarray(lengths, dtype=np.int64)
        if slots.ndim != 1 or lengths.shape != slots.shape:
            raise ValueError("slots and lengths must be 1-d of equal length")
        if (lengths < 0).any():
            raise ValueError("lengths must be non-negative")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uintp)
        arrays = []
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, np.ndarray) or x.ndim != 3:
                raise ValueError(f"`{name}` must be a 3-d array [tokens, heads, width]")
            arrays.append(_array(name, x[None]))
        out = np.empty((1, arrays[0].shape[1], arrays[0].shape[2], self._dv), dtype=arrays[0].dtype)
        self._state.decode_slots(slots, offsets, *arrays, out, "blhd")
        return out[0]

    def tokens(self, slot):
        """Tokens slot `slot` has consumed."""
        return self._state.tokens(slot)

    def reset(self, slot):
        """Empties one slot."""
        self._state.reset(slot)

    def copy(self, src, dst):
        """Copies slot `src` over slot `dst` (beam search, a shared prompt)."""
        self._state.copy(src, dst)

    def save(self, slot):
        """One slot as bytes (versioned, with a fingerprint of the map and sizes)."""
        return self._state.save(slot)

    def load(self, slot, data):
        """Overwrites a slot with bytes from `save`; ValueError when made for another problem."""
        self._state.load(slot, bytes(data))
