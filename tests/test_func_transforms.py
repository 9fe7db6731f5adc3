"""torch.func.grad through tkern's ops (their autograd.Functions use setup_context, as functorch
requires), and the clear error vmap gives (no vmap rule: the kernels take whole batches)."""

import pytest
import torch
import torch.nn.functional as F

import tkern

W = torch.arange(4.0, dtype=torch.float64)  # a non-uniform loss weight, so gradients are not ~0


def _w(t, n=4):
    return W[:n].to(t.device)


CASES = {
    "activation_dropout": (lambda t: tkern.activation_dropout(t, "silu", 0.0, bias=_w(t)),
                           lambda t: F.silu(t + _w(t))),
    "local_response_norm": (lambda t: tkern.local_response_norm(t, 3, alpha=0.5),
                            lambda t: F.local_response_norm(t, 3, alpha=0.5)),
    "batch_norm": (lambda t: tkern.batch_norm(t, None, None, training=True, activation="tanh"),
                   lambda t: torch.tanh(F.batch_norm(t, None, None, training=True))),
    "batch_norm_eval": (lambda t: tkern.batch_norm(t, _w(t, 3), _w(t, 3) + 1, activation="elu"),
                        lambda t: F.elu(F.batch_norm(t, _w(t, 3), _w(t, 3) + 1))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_func_grad_matches_torch(device, name):
    ours, theirs = CASES[name]
    x = torch.randn(2, 3, 4, device=device, dtype=torch.float64)
    w = W.to(device)

    def loss(fn):
        return lambda t: (fn(t) ** 2 * w).sum()

    g = torch.func.grad(loss(ours))(x)
    g_ref = torch.func.grad(loss(theirs))(x)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_vmap_says_it_is_unsupported(device):
    x = torch.randn(2, 2, 3, 4, device=device)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.vmap(lambda t: tkern.local_response_norm(t, 3))(x)
