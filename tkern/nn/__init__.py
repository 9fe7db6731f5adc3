"""Drop-in modules: each subclasses (or mirrors) its torch.nn counterpart, same state_dict."""

from . import utils
from .activation_dropout import ActivationDropout
from .lrn import LocalResponseNorm

__all__ = ["ActivationDropout", "LocalResponseNorm", "utils"]
