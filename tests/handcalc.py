"""Hand computations for tiny linear split models, written with explicit matrix formulas (no
autograd), used by the algorithm tests as the expected values."""
import torch


def softmax(z):
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def onehot(y, c):
    return torch.eye(c, dtype=torch.float64)[y]


def linear_ce(x, W, b, y):
    """out = x W^T + b; CE_mean. Returns (dOut, dW, db, dx)."""
    p = softmax(x @ W.T + b)
    dout = (p - onehot(y, W.shape[0])) / x.shape[0]
    return dout, dout.T @ x, dout.sum(0), dout @ W


def adam_first(p, g, lr, wd, eps=1e-8):
    """Adam's first step from zero state: p - lr * g'/(|g'| + eps) with g' = g + wd p."""
    g = g + wd * p
    return p - lr * g / (g.abs() + eps)


def align_grads(Z, W, b, Y, T, n):
    """Closed form of d/d(W, b) of sum((g_hat - T)^2), g_hat = d(CE_sum(Z W^T + b, Y)/n)/dZ."""
    p = softmax(Z @ W.T + b)
    G = (p - onehot(Y, W.shape[0])) / n
    g_hat = G @ W
    R = 2 * (g_hat - T)
    dP = (R @ W.T) / n
    dz = p * (dP - (dP * p).sum(1, keepdim=True))
    return G.T @ R + dz.T @ Z, dz.sum(0), float(((g_hat - T) ** 2).sum())
