"""U-Net topology: where motion blocks go in an SD1.5-family U-Net, and whether a motion module fits one.

A U-Net (or a ControlNet's encoder) is described block by block, in LDM's order (``input_blocks``, ``middle_block``,
``output_blocks``), by the kinds of each block's layers: ``"res"`` (ResBlock), ``"attn"`` (spatial transformer),
``"down"`` (Downsample), ``"up"`` (Upsample) or ``"other"`` (e.g. the input convolution). AnimateDiff places a motion
block after every res(+attention) layer of each down level, after every layer of each up level (before its
Upsample) and after the middle block's attention. The same rules place the motion blocks of the Video ControlNet
(down and middle: a ControlNet has no up levels) and those the motion nodes insert into ComfyUI's U-Net.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputMismatchError

SUGGESTION = "SD1.5: mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt or a DreaMoving motion module"


@dataclass(frozen=True)
class Block:
    """One U-Net block: the kinds of its layers in order, and its width (its ResBlock's output channels; None for a
    block without one)."""

    kinds: tuple[str, ...]
    width: int | None = None


@dataclass(frozen=True)
class Site:
    """Where one motion block goes: block ``index`` (of ``input_blocks`` / ``output_blocks``; 0 for the middle
    block), before its layer ``before`` (None: after the last layer), for features of ``width`` channels."""

    index: int
    before: int | None
    width: int


@dataclass(frozen=True)
class Layout:
    """Motion-block widths: ``down[level]`` (one width per layer), ``mid`` (None: no middle block), ``up[level]``
    (``up[0]`` the innermost level)."""

    down: tuple[tuple[int, ...], ...]
    mid: int | None
    up: tuple[tuple[int, ...], ...]

    def describe(self, decoder: bool = True) -> str:
        """E.g. ``2 levels of widths 320/320 (1/1 layers down, 2/2 up)``."""
        def counts(levels):
            return "/".join(str(len(level)) for level in levels)

        widths = "/".join(str(level[0]) if level else "?" for level in self.down)
        layers = f"{counts(self.down)} layers down, {counts(self.up)} up" if decoder else f"{counts(self.down)} layers"
        return f"{len(self.down)} levels of widths {widths} ({layers})"


@dataclass(frozen=True)
class MotionSites:
    """Motion sites of a U-Net, ordered as ``MotionModule`` orders its blocks: ``down[level][j]``, ``mid`` (None
    without a middle block), ``up[level][j]`` with ``up[0]`` the innermost level."""

    down: tuple[tuple[Site, ...], ...]
    mid: Site | None
    up: tuple[tuple[Site, ...], ...]

    @property
    def layout(self) -> Layout:
        def widths(levels):
            return tuple(tuple(site.width for site in level) for level in levels)

        return Layout(widths(self.down), None if self.mid is None else self.mid.width, widths(self.up))


def motion_sites(input_blocks: Sequence[Block], middle: Block | None = None,
                 output_blocks: Sequence[Block] = ()) -> MotionSites:
    """Where AnimateDiff puts motion blocks in a U-Net with these blocks (see the module docstring)."""
    down: list[list[Site]] = [[]]
    for i, block in enumerate(input_blocks):
        if "down" in block.kinds:
            down.append([])
        elif "res" in block.kinds:
            down[-1].append(Site(i, None, block.width))
    mid = None
    if middle is not None and middle.kinds:
        kinds = middle.kinds
        anchor = max((j for j, kind in enumerate(kinds) if kind == "attn"), default=kinds.index("res"))
        mid = Site(0, anchor + 1, middle.width)
    up: list[list[Site]] = [[]]
    for i, block in enumerate(output_blocks):
        upsample = block.kinds.index("up") if "up" in block.kinds else None
        up[-1].append(Site(i, upsample, block.width))
        if upsample is not None:
            up.append([])
    return MotionSites(tuple(map(tuple, down)), mid, tuple(map(tuple, up)) if output_blocks else ())


def module_layout(down_blocks: Sequence[Sequence], mid_block=None, up_blocks: Sequence[Sequence] = ()) -> Layout:
    """The ``Layout`` of motion blocks (anything with ``.channels``, e.g. ``MotionBlock``) given per level."""
    def widths(levels):
        return tuple(tuple(block.channels for block in level) for level in levels)

    return Layout(widths(down_blocks), None if mid_block is None else mid_block.channels, widths(up_blocks))


def check_motion_fit(motion: Layout, unet: Layout, motion_name: str, target: str, decoder: bool = True) -> None:
    """Raise ``InputMismatchError`` unless a motion module with layout ``motion`` has one block of the right width for
    every site of ``unet`` (``target`` names it in the message, e.g. "this MODEL's U-Net"): the same down levels, the
    same up levels when ``decoder`` (a ControlNet has none), a middle site for a middle block."""
    if motion.down != unet.down or (decoder and motion.up != unet.up):
        raise InputMismatchError(
            f"motion module '{motion_name}' is made for a U-Net with {motion.describe(decoder)}, but {target} has "
            f"{unet.describe(decoder)}; use a motion module made for this model ({SUGGESTION})")
    if motion.mid is not None and unet.mid is None:
        raise InputMismatchError(f"motion module '{motion_name}' has a middle block but {target} has none; use a "
                                 f"motion module without one ({SUGGESTION})")
    if motion.mid is not None and motion.mid != unet.mid:
        raise InputMismatchError(f"motion module '{motion_name}' has a middle block of width {motion.mid}, but "
                                 f"{target}'s middle block is {unet.mid} wide; use a motion module made for this "
                                 f"model ({SUGGESTION})")
