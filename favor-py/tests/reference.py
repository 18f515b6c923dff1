"""A NumPy float64 FAVOR+ (positive features) to test favor against, and exact softmax."""

import numpy as np


def phi_hat(x, w, eps=1e-6, tau=None):
    """favor's unstabilised positive features m^{-1/2}·exp(s)·(exp(a − h − s) + ε), a = W x̃,
    h = ‖x̃‖²/2, s = max_j(a_j − h), x̃ = √τ·x (τ = 1/√d by default). The attention output
    depends on these alone (stabilisers cancel)."""
    d = x.shape[-1]
    tau = d**-0.5 if tau is None else tau
    xt = x * np.sqrt(tau)
    a = xt @ w.T
    h = 0.5 * (xt**2).sum(-1, keepdims=True)
    s = (a - h).max(-1, keepdims=True)
    return np.exp(s) * (np.exp(a - h - s) + eps) / np.sqrt(w.shape[0])


def favor_attention(q, k, v, w, causal=False, key_mask=None, tau=None):
    """q [B, H, L, d], k [B, Hk, Lk, d], v [B, Hk, Lk, dv], all float64."""
    q, k, v, w = (np.asarray(x, dtype=np.float64) for x in (q, k, v, w))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    pq, pk = phi_hat(q, w, tau=tau), phi_hat(k, w, tau=tau)
    if key_mask is not None:
        pk = pk * np.asarray(key_mask, dtype=np.float64)[:, None, :, None]
    scores = pq @ pk.swapaxes(-1, -2)
    if causal:
        scores = np.tril(scores)
    return (scores @ v) / scores.sum(-1, keepdims=True)


def softmax_attention(q, k, v, causal=False):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    logits = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], dtype=bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v
