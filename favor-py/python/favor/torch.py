"""PyTorch front end: an autograd function and performer-pytorch's `FastAttention` module.

    from favor.torch import FastAttention
    attn = FastAttention(dim_heads=64, nb_features=256, causal=True)
    out = attn(q, k, v)          # [batch, heads, len, dim_heads], gradients through favor

CPU tensors are shared with favor without a copy (DLPack); bfloat16 tensors are passed as their
bits. CUDA tensors go to favor's CUDA backend as device pointers, on PyTorch's current stream,
without a copy (a key mask sends them through the host instead); tensors on other devices are
copied to the host and back.
"""

import functools
import math

import numpy as np
import torch
from torch import nn

import favor

__all__ = ["attention", "FavorAttention", "FastAttention"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _host(t):
    """A NumPy view of a tensor on the host (shared memory for CPU tensors)."""
    if t.dtype not in _DTYPES:
        raise TypeError(f"favor takes float32, float16 or bfloat16 tensors, got {t.dtype}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return np.from_dlpack(t.view(torch.int16)).view(np.uint16)
    return np.from_dlpack(t)


def _tensor(a, like):
    """A NumPy result as a tensor of `like`'s dtype on `like`'s device (no copy on the CPU)."""
    t = torch.from_numpy(a)
    if like.dtype == torch.bfloat16:
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.to(like.device)


@functools.lru_cache(maxsize=16)
def _device_backend(index, stream):
    return favor._favor.DeviceBackend(f"cuda:{index}", stream)


def _on_device(q, options):
    """The CUDA backend on q's device and PyTorch's current stream there, or None to go through
    the host."""
    if q.device.type != "cuda" or options.get("key_mask") is not None or not hasattr(favor._favor, "DeviceBackend"):
        return None
    return _device_backend(q.device.index or 0, torch.cuda.current_stream(q.device).cuda_stream)


def _described(t):
    """(pointer, shape, strides, dtype) of a CUDA tensor whose last axis is contiguous, and the
    tensor (a contiguous copy when it was not)."""
    if t.dtype not in _DTYPES:
        raise TypeError(f"favor takes float32, float16 or bfloat16 tensors, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"favor takes 4-d tensors, got shape {list(t.shape)}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch.")), t


def _device_map(q, projection, options):
    w = None if projection is None else projection.detach().cpu().numpy()
    return favor._map(options.get("feature_map", "positive"), 0 if w is None else w.shape[0], q.shape[-1], 0, True, options.get("scale"), w)


class FavorAttention(torch.autograd.Function):
    """favor's forward and backward as an autograd function:
    `FavorAttention.apply(q, k, v, projection, causal, options)` with `options` a dict of
    favor.attention keyword arguments (feature_map, layout, scale, key_mask, backend)."""

    @staticmethod
    def forward(ctx, q, k, v, projection, causal, options):
        ctx.causal, ctx.options = causal, options
        ctx.save_for_backward(q, k, v, projection)
        dev = _on_device(q, options)
        if dev is not None:
            out = torch.empty(tuple(q.shape[:3]) + (v.shape[3],), dtype=q.dtype, device=q.device)
            (qd, _q), (kd, _k), (vd, _v), (od, _) = (_described(t.detach()) for t in (q, k, v, out))
            layout = options.get("layout", "bhld")
            favor._favor.forward_device(dev, _device_map(q, projection, options), qd, kd, vd, od, causal, layout)
            return out
        w = None if projection is None else projection.detach().cpu().numpy()
        out = favor.attention(_host(q), _host(k), _host(v), causal=causal, projection=w, **options)
        return _tensor(out, q)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, projection = ctx.saved_tensors
        dev = _on_device(q, ctx.options)
        if dev is not None:
            grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
            described = [_described(t.detach()) for t in (q, k, v, dout, *grads)]
            layout = ctx.options.get("layout", "bhld")
            fmap = _device_map(q, projection, ctx.options)
            favor._favor.backward_device(dev, fmap, *(d for d, _ in described), ctx.causal, layout)
            return (*grads, None, None, None)
        w = None if projection is None else projection.detach().cpu().numpy()
        grads = favor.attention_backward(
            _host(q), _host(k), _host(v), _host(dout.contiguous()), causal=ctx.causal, projection=w, **ctx.options
        )
        dq, dk, dv = (_tensor(g, x) for g, x in zip(grads, (q, k, v)))
        return dq, dk, dv, None, None, None


def attention(q, k, v, projection=None, causal=False, num_features=256, seed=0, **options):
    """favor.attention on tensors, differentiable in q, k and v. Without `projection`, W is
    drawn from `seed` (the same W as favor.draw_projection(num_features, d, seed))."""
    if projection is None and options.get("feature_map", "positive") != "elu":
        projection = torch.from_numpy(favor.draw_projection(num_features, q.shape[-1], seed))
    return FavorAttention.apply(q, k, v, projection, causal, options)


class FastAttention(nn.Module):
    """performer-pytorch's `FastAttention(q, k, v)` on favor: q, k, v [batch, heads, len,
    dim_heads]. `nb_features` defaults to dim_heads·ln(dim_heads), as there. The projection is a
    buffer (saved with the module); `redraw_projection_matrix()` draws a new one.

    Differences: orthogonal rows always have χ(d) norms (performer-pytorch's ortho_scaling = 0);
    `generalized_attention` uses favor's Performer-ReLU map (ReLU(Wx/√m) + 0.001), and
    `no_projection` favor's ELU+1 map; other `kernel_fn`s are not supported.
    """

    def __init__(
        self,
        dim_heads,
        nb_features=None,
        ortho_scaling=0,
        causal=False,
        generalized_attention=False,
        kernel_fn=None,
        no_projection=False,
        seed=0,
        backend="best",
    ):
        super().__init__()
        if ortho_scaling != 0:
            raise ValueError("favor's orthogonal rows have χ(d) norms (ortho_scaling = 0)")
        if kernel_fn is not None and not isinstance(kernel_fn, nn.ReLU):
            raise ValueError("favor's generalized attention uses ReLU features; other kernel_fn are not supported")
        self.dim_heads = dim_heads
        self.nb_features = nb_features if nb_features is not None else int(dim_heads * math.log(dim_heads))
        self.causal = causal
        self.no_projection = no_projection
        self.feature_map = "elu" if no_projection else ("relu" if generalized_attention else "positive")
        self.backend = backend
        self.seed = seed
        self.register_buffer("projection_matrix", self._draw(seed))

    def _draw(self, seed):
        if self.no_projection:
            return torch.empty(0)
        return torch.from_numpy(favor.draw_projection(self.nb_features, self.dim_heads, seed))

    @torch.no_grad()
    def redraw_projection_matrix(self, seed=None):
        """Draws a new projection (from `seed`, or the next seed)."""
        self.seed = self.seed + 1 if seed is None else seed
        self.projection_matrix.copy_(self._draw(self.seed))

    def forward(self, q, k, v):
        w = None if self.no_projection else self.projection_matrix
        options = {"feature_map": self.feature_map, "backend": self.backend}
        return FavorAttention.apply(q, k, v, w, self.causal, options)
