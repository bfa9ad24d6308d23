"""diffusers' SD1.5 U-Net running the pack's own modules, so what is trained is exactly what the nodes run.

* **Motion blocks** (:class:`~dreamoving_core.motion.model.MotionModule`) run where AnimateDiff puts them, by forward
  hooks on diffusers' layers: after each res(+attention) layer of every down and up block (the hook sits on the
  layer's attention when the block has one, else on its resnet; up blocks run it before their upsampler) and after
  the middle block's attention. The U-Net's modules, names and weights are untouched.
* **Video ControlNet** residuals (:class:`~dreamoving_core.control.model.ControlResiduals`) enter as diffusers'
  ``down_block_additional_residuals`` / ``mid_block_additional_residual`` (ComfyUI's ``control`` output/middle).
* **Content Guider** terms of Eq. 1 run in an attention processor on every cross-attention layer, calling
  :func:`~dreamoving_core.guider.model.decoupled_cross_attention` with each source's own ``to_k`` / ``to_v``.

Frames travel folded into the batch, ``(B·F, C, H, W)``, as in ComfyUI.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..control.model import ControlResiduals
from ..errors import ModelFormatError
from ..guider.model import AttentionTerm, ContentSource, decoupled_cross_attention
from ..motion.model import MotionBlock, MotionModule
from ..unet.topology import Layout
from ..unet.topology import check_motion_fit as fit_topology


def _layers(block: nn.Module) -> list[nn.Module]:
    """The modules of a diffusers block after which motion blocks run: its attentions, else its resnets."""
    attentions = getattr(block, "attentions", None)
    return list(attentions) if attentions else list(block.resnets)


def motion_sites(unet) -> tuple[list[list[nn.Module]], nn.Module | None, list[list[nn.Module]]]:
    """``(down[level][j], mid, up[level][j])``: the diffusers modules whose outputs the motion blocks take, in the
    levels of :class:`MotionModule` (``up[0]`` innermost)."""
    down = [_layers(block) for block in unet.down_blocks]
    up = [_layers(block) for block in unet.up_blocks]
    mid_block = getattr(unet, "mid_block", None)
    mid = None if mid_block is None else (_layers(mid_block)[-1] if getattr(mid_block, "attentions", None)
                                          else mid_block.resnets[0])
    return down, mid, up


def unet_layout(unet_config: dict) -> Layout:
    """The motion-block ``Layout`` of the diffusers U-Net described by ``unet_config`` (AnimateDiff's placement: one
    block per down layer, per up layer (one more than down) and after the middle block)."""
    channels = tuple(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    return Layout(tuple((c,) * layers for c in channels), channels[-1],
                  tuple((c,) * (layers + 1) for c in reversed(channels)))


def check_motion_fit(unet_config: dict, motion: MotionModule, name: str) -> None:
    """Raise ``InputMismatchError`` unless ``motion`` has a block of the right width for every motion site of the
    U-Net described by the diffusers config ``unet_config`` (``unet.topology.check_motion_fit``)."""
    fit_topology(motion.layout, unet_layout(unet_config), name, "the base U-Net")


@dataclass
class GuidanceTerm:
    """One image source of Eq. 1 in a U-Net call: ``alpha`` · attention to ``source``'s keys/values of ``tokens``
    ``(B, N, 768)`` (one row per video, shared by its frames)."""

    alpha: float
    source: ContentSource
    tokens: torch.Tensor


class GuidedCrossAttention:
    """diffusers attention processor for cross-attention layer ``layer`` (IP-Adapter order: down, up, mid blocks):
    Eq. 1 over the text keys/values and those of the call's :class:`GuidanceTerm` s (none: plain text attention)."""

    def __init__(self, layer: int, owner: "DreaMovingUNet"):
        self.layer, self.owner = layer, owner

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        # one K/V row per video (B, N, C): its F frames attend to it as one group (AttentionTerm)
        terms = [AttentionTerm(t.alpha, *(proj[self.layer](t.tokens) for proj in (t.source.to_k, t.source.to_v)))
                 for t in self.owner.guidance]
        out = decoupled_cross_attention(q, k, v, attn.heads, terms)
        return attn.to_out[1](attn.to_out[0](out))


def _check_sd15_attention(attn, name: str) -> None:
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross or attn.residual_connection \
            or attn.rescale_output_factor != 1.0:
        raise ModelFormatError(f"cross-attention '{name}' is not an SD1.5 one (extra norms or residuals); the "
                               "Content Guider trains on SD1.5 U-Nets")


class DreaMovingUNet:
    """A frozen diffusers ``UNet2DConditionModel`` with our motion blocks (optional) and Content Guider attention
    (``guided=True``) installed; ``remove()`` restores it.

    ``__call__(sample (B·F, 4, h, w), timesteps (B·F,), encoder_hidden_states (B·F, 77, 768), num_frames,
    control=None, guidance=()) -> (B·F, 4, h, w)`` predicts the noise. ``checkpointing`` recomputes each motion
    block's activations in the backward pass (with diffusers' own gradient checkpointing for the U-Net); a call's
    frame count and guidance stay in effect until the next call, so run a call's backward before the next call.
    """

    def __init__(self, unet, motion: MotionModule | None = None, motion_name: str = "motion module",
                 guided: bool = False):
        self.unet, self.motion = unet, motion
        self.num_frames = 1
        self.guidance: Sequence[GuidanceTerm] = ()
        self.checkpointing = False
        self._handles = []
        self._processors = None
        if motion is not None:
            check_motion_fit(dict(unet.config), motion, motion_name)
            self._install_motion(motion)
        if guided:
            self._install_guidance()

    def _install_motion(self, motion: MotionModule) -> None:
        down, mid, up = motion_sites(self.unet)
        pairs = [(site, block) for sites, blocks in ((down, motion.down_blocks), (up, motion.up_blocks))
                 for level_sites, level_blocks in zip(sites, blocks) for site, block in zip(level_sites, level_blocks)]
        if motion.mid_block is not None:
            if mid is None:
                raise ModelFormatError("the motion module has a middle block but the base U-Net has none")
            pairs.append((mid, motion.mid_block))
        for site, block in pairs:
            self._handles.append(site.register_forward_hook(self._motion_hook(block)))

    def _motion_hook(self, block: MotionBlock):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if self.checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(block, hidden, self.num_frames, use_reentrant=False)
            else:
                hidden = block(hidden, self.num_frames)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def _install_guidance(self) -> None:
        self._processors = dict(self.unet.attn_processors)
        processors, layer = {}, 0
        for name, processor in self._processors.items():
            if name.endswith("attn2.processor"):
                _check_sd15_attention(self.unet.get_submodule(name.rsplit(".", 1)[0]), name)
                processors[name] = GuidedCrossAttention(layer, self)
                layer += 1
            else:
                processors[name] = processor
        self.unet.set_attn_processor(processors)

    def cross_attention_layers(self) -> list[nn.Module]:
        """The U-Net's text cross-attention modules in IP-Adapter order (down, up, middle blocks): the layers a
        guider's K/V pairs belong to."""
        return [self.unet.get_submodule(name.rsplit(".", 1)[0])
                for name in self.unet.attn_processors if name.endswith("attn2.processor")]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._processors is not None:
            self.unet.set_attn_processor(self._processors)
            self._processors = None

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 num_frames: int, control: ControlResiduals | None = None,
                 guidance: Sequence[GuidanceTerm] = ()) -> torch.Tensor:
        if guidance and self._processors is None:
            raise ValueError("guidance terms need a DreaMovingUNet built with guided=True")
        # Kept until the next call: gradient checkpointing re-runs parts of this forward during backward.
        self.num_frames, self.guidance = num_frames, tuple(guidance)
        return self.unet(sample, timesteps, encoder_hidden_states,
                         down_block_additional_residuals=None if control is None else tuple(control.down),
                         mid_block_additional_residual=None if control is None else control.mid,
                         return_dict=False)[0]
