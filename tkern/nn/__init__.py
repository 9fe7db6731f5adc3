"""Drop-in modules: each subclasses (or mirrors) its torch.nn counterpart, same state_dict."""

from . import utils
from .activation_dropout import ActivationDropout
from .lrn import LocalResponseNorm
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync_batch_norm import SyncBatchNorm

__all__ = ["ActivationDropout", "LocalResponseNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "utils"]
