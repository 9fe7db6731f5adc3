"""``tkern.nn.utils.weight_norm``: torch's weight-norm parametrization, computed by tkern's kernel.

The parametrization subclasses torch's own ``_WeightNorm`` (same ``dim`` handling, same
``right_inverse``), so the module's state_dict keys are ``parametrizations.<name>.original0`` (g)
and ``original1`` (v), exactly as with ``torch.nn.utils.parametrizations.weight_norm``: checkpoints
load either way, and ``torch.nn.utils.parametrize.remove_parametrizations`` removes it.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm as _TorchWeightNorm

from ..ops.weight_norm import weight_norm as _weight_norm_op

__all__ = ["WeightNorm", "weight_norm"]


class WeightNorm(_TorchWeightNorm):
    """Parametrization ``(g, v) -> g * v / ||v||`` running tkern's fused kernel; ``dim=None``
    (stored as -1, as torch does) is the whole-tensor norm."""

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        return _weight_norm_op(weight_v, weight_g, self.dim)


def weight_norm(module: torch.nn.Module, name: str = "weight",
                dim: int | None = 0) -> torch.nn.Module:
    """Apply weight normalization to ``module.<name>`` (in place; returns the module), as
    ``torch.nn.utils.parametrizations.weight_norm`` does, computed by ``tkern.weight_norm``.

    ``original0`` holds g (``torch.norm_except_dim(weight, 2, dim)``) and ``original1`` holds v.
    Legacy checkpoints with ``<name>_g`` / ``<name>_v`` keys (the deprecated
    ``torch.nn.utils.weight_norm``) are renamed on load, as torch's parametrization does.
    """
    parametrize.register_parametrization(module, name, WeightNorm(dim), unsafe=True)

    def _legacy_keys_hook(state_dict, prefix, local_metadata, strict, missing_keys,
                          unexpected_keys, error_msgs) -> None:
        g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
        if g_key in state_dict and v_key in state_dict:
            state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(g_key)
            state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(v_key)

    module._register_load_state_dict_pre_hook(_legacy_keys_hook)
    return module
