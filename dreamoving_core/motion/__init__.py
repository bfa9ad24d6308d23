"""Motion blocks (AnimateDiff's temporal transformers after the U-Net's blocks): the model and its file formats."""
from .model import (DEFAULT_POSITIONAL_LENGTH, PE_EXTENSIONS, TORCH_OPS, MotionBlock, MotionModule,
                    MotionModuleConfig, PeExtension, extend_positional_encoding, sinusoidal_positions)

__all__ = ["DEFAULT_POSITIONAL_LENGTH", "PE_EXTENSIONS", "TORCH_OPS", "MotionBlock", "MotionModule",
           "MotionModuleConfig", "PeExtension", "extend_positional_encoding", "sinusoidal_positions"]
