"""Drop-in modules: each subclasses (or mirrors) its torch.nn counterpart, same state_dict."""

from . import utils
from .activation_dropout import ActivationDropout

__all__ = ["ActivationDropout", "utils"]
