"""``tkern.nn.SyncBatchNorm``: torch's SyncBatchNorm on tkern kernels, on NCCL and (unlike torch's)
on gloo with CPU tensors."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..activations import activation_scalars, check_activation, kernel_name
from ..ops.sync_batch_norm import sync_batch_norm
from .batch_norm import _TkernBatchNormMixin, drop_bias, split_bias


class SyncBatchNorm(_TkernBatchNormMixin, torch.nn.SyncBatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm`` with an optional fused activation.

    Training with an initialised process group of world size > 1 normalizes with the statistics of
    the global batch (one all_gather forward, one all_reduce backward); otherwise it behaves as
    tkern's BatchNorm.  Eval does no communication.  Same constructor arguments as torch's, plus
    keyword-only ``activation`` and its parameters, as :class:`tkern.nn.BatchNorm1d`.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, activation=None,
                 negative_slope=0.01, alpha=1.0, approximate="none", min_val=-1.0, max_val=1.0,
                 beta=1.0, threshold=20.0, **kwargs):
        # torch's constructor, not the mixin's: SyncBatchNorm takes process_group before device
        bias = split_bias(kwargs)
        torch.nn.SyncBatchNorm.__init__(self, num_features, eps, momentum, affine,
                                        track_running_stats, process_group, device, dtype, **kwargs)
        drop_bias(self, bias)
        check_activation(activation, approximate)
        activation_scalars(activation, negative_slope, alpha, min_val, max_val, beta, threshold)
        self.activation = activation
        self.negative_slope = negative_slope
        self.alpha = alpha
        self.approximate = approximate
        self.min_val, self.max_val = min_val, max_val
        self.beta, self.threshold = beta, threshold

    def _group(self):
        """The process group to synchronise over, or None when there is nothing to sync."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self._group() if self.training else None
        if group is None:
            return super().forward(input)  # tkern's BatchNorm
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        track = self.track_running_stats
        negative_slope, alpha = self._activation_scalars()  # the kernels' two scalars
        return sync_batch_norm(
            input, self.running_mean if track else None, self.running_var if track else None,
            self.weight, self.bias, momentum if track else 0.0, self.eps, group,
            activation=self.activation or "identity",
            kernel_activation=kernel_name(self.activation, self.approximate),
            negative_slope=negative_slope, alpha=alpha, approximate=self.approximate,
            num_batches_tracked=self.num_batches_tracked if track else None,
        )

    @staticmethod
    @contextlib.contextmanager
    def allow_cpu_ddp():
        """Build a ``DistributedDataParallel`` of a CPU module holding tkern SyncBatchNorm layers.

        DDP's constructor rejects every ``torch.nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm
        layers only work with GPU modules"), tkern's subclass included, although tkern's runs on
        gloo.  Inside this context that one check is lifted for tkern's layers (torch's own are
        still refused); it only matters while the wrapper is constructed::

            with tkern.nn.SyncBatchNorm.allow_cpu_ddp():
                model = DistributedDataParallel(model)
        """
        ddp = torch.nn.parallel.DistributedDataParallel
        original = ddp._passing_sync_batchnorm_handle

        def check(self, module):
            foreign = [m for m in module.modules()
                       if isinstance(m, torch.nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm)]
            if foreign and self.device_type == "cpu":
                original(self, module)

        ddp._passing_sync_batchnorm_handle = check
        try:
            yield
        finally:
            ddp._passing_sync_batchnorm_handle = original

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every BatchNorm*d (torch's or tkern's, SyncBatchNorm included) in ``module`` with
        a tkern SyncBatchNorm that holds the same parameters and buffers and keeps a fused
        activation.  Returns the converted module (a new one when ``module`` itself is a
        BatchNorm)."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group,
                      activation=getattr(module, "activation", None),
                      negative_slope=getattr(module, "negative_slope", 0.01),
                      alpha=getattr(module, "alpha", 1.0),
                      approximate=getattr(module, "approximate", "none"),
                      **{k: getattr(module, k, v) for k, v in
                         dict(min_val=-1.0, max_val=1.0, beta=1.0, threshold=20.0).items()})
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
