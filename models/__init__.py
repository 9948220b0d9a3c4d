"""Networks and text encoders."""

from .registry import SIZES, build, build_model, model_config
from .unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "SIZES", "build", "build_model", "model_config"]
