"""A whole DreaMoving model inside ComfyUI, in this process: the compile tests and the benchmarks run it.

``build(...)`` makes what the shipped graph makes, with random weights and the pack's own node functions: an SD1.5
``ModelPatcher`` (ComfyUI's ``BaseModel`` and ``UNetModel``), motion blocks injected by ``apply_motion``, the Content
Guider's face (and cloth) terms by ``apply_guidance``, and a Video ControlNet carried in the conditioning by
``apply_control``. :meth:`DreaMovingModel.sample` runs ComfyUI's own sampler on it (CFG, one U-Net call per step on
the cond and uncond videos together); :meth:`DreaMovingModel.step` is one U-Net call as the sampler makes it.

``full_size``: SD1.5's widths (320/640/1280/1280), a full motion module, a full Video ControlNet and SD1.5 guider
layers; otherwise the tiny SD1.5 layout of ``devtools.tiny.checkpoint`` (two 320-wide levels).
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from devtools.tiny import comfy_importable, pack_nodes

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False)
SD15_GUIDER_LAYERS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
GUIDER_SLOTS = ("face", "cloth")


def setup(device: str = "cpu") -> types.SimpleNamespace:
    """ComfyUI on ``device`` with PyTorch attention (SDPA, its default on GPUs; on the CPU it would pick split
    attention, whose memory probing is a graph break of ComfyUI's own), and the pack's node modules."""
    comfy_importable(cpu=device == "cpu")
    from comfy.cli_args import args

    args.use_pytorch_cross_attention = True
    import comfy.ldm.modules.attention as attention

    if attention.optimized_attention is not attention.attention_pytorch:  # imported before this call
        attention.optimized_attention = attention.attention_pytorch
    return types.SimpleNamespace(motion=pack_nodes("motion", cpu=device == "cpu"),
                                 guider=pack_nodes("content_guider", cpu=device == "cpu"),
                                 control=pack_nodes("video_controlnet", cpu=device == "cpu"))


def randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Random weights (norm weights near 1), non-zero everywhere, so every block changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale + base)
    return module


@dataclass
class DreaMovingModel:
    """The patched U-Net and the conditioning that carries the Video ControlNet; ``frames`` per video."""

    nodes: types.SimpleNamespace
    patcher: object
    positive: list
    negative: list
    frames: int
    size: int

    def latent(self, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.frames, 4, self.size // 8, self.size // 8, generator=gen)

    def sample(self, steps: int = 2, cfg: float = 4.0, seed: int = 0, latent: torch.Tensor | None = None,
               patcher=None) -> torch.Tensor:
        """ComfyUI's KSampler (euler, normal schedule) from noise: the denoised latents ``(F, 4, h, w)``."""
        import comfy.sample

        latent = self.latent(seed) if latent is None else latent
        noise = comfy.sample.prepare_noise(torch.zeros_like(latent), seed)
        return comfy.sample.sample(patcher or self.patcher, noise, steps, cfg, "euler", "normal", self.positive,
                                   self.negative, torch.zeros_like(latent), disable_pbar=True, seed=seed)


def conditioning(context_dim: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, context_dim, generator=gen), {}]]


@dataclass
class Parts:
    """The random models one benchmark or test run shares: the base U-Net patcher, a motion module, a Content Guider
    with its face and cloth keys/values, a Video ControlNet and its hint (one image for every frame)."""

    nodes: types.SimpleNamespace
    base: object
    motion: object
    guider: object
    kv: dict
    control: object
    hint: torch.Tensor
    frames: int
    size: int

    def model(self, *, motion: bool = True, control: bool = True, guider: tuple[str, ...] = GUIDER_SLOTS,
              context=None, frames: int | None = None) -> DreaMovingModel:
        """The DreaMoving model with the chosen parts applied by the nodes' own functions; ``context``: the Motion
        Context Options' ``ContextOptions`` (windows), if any; ``frames``: another video length."""
        patcher = self.base
        if motion:
            patcher = self.nodes.motion.apply_motion(patcher, self.motion, 1.0, context)
        for slot in guider:
            patcher = self.nodes.guider.apply_guidance(patcher, slot, self.guider, self.kv[slot], 1.0, 0.0, 1.0)
        positive, negative = conditioning(768, 3), conditioning(768, 4)
        if control:
            vcn = self.nodes.control.VideoControl(self.control, "random controlnet", load_device=self.base.load_device)
            positive, negative = self.nodes.control.apply_control(positive, negative, vcn, self.hint, 1.0, (0.0, 1.0))
        return DreaMovingModel(self.nodes, patcher, positive, negative, frames or self.frames, self.size)


def parts(frames: int = 4, size: int = 64, *, full_size: bool = False, device: str = "cpu",
          dtype: torch.dtype = torch.float32, nodes: types.SimpleNamespace | None = None) -> Parts:
    """Random parts (see the module docstring) for videos of ``frames`` frames at ``size``² pixels."""
    nodes = nodes or setup(device)
    import comfy.model_patcher
    import comfy.ops
    import comfy.supported_models

    from devtools.tiny.checkpoint import TINY_UNET_CONFIG
    from devtools.tiny.content_guider import GUIDER_METADATA, TINY_LAYER_DIMS, guider_weights
    from dreamoving_core.control.format import build_video_controlnet
    from dreamoving_core.control.model import ControlNetConfig, VideoControlNet
    from dreamoving_core.guider.format import parse_guider_state_dict
    from dreamoving_core.guider.model import ContentGuider, ContentSource, ImageFeatures
    from dreamoving_core.motion.model import MotionModule, MotionModuleConfig

    unet_config = dict(SD15_UNET if full_size else TINY_UNET_CONFIG)
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, device=torch.device(device))
    randomise(base.diffusion_model).to(device, dtype)
    load = torch.device(device)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load, offload_device=load)
    widths = tuple(unet_config["model_channels"] * m for m in unet_config["channel_mult"])
    per_level = unet_config["num_res_blocks"][0]

    mm_config = MotionModuleConfig(channels=widths, down_layers=per_level, up_layers=per_level + 1)
    module = randomise(MotionModule(mm_config, ops=comfy.ops.manual_cast), seed=1).to(device, dtype).eval()
    motion = nodes.motion.LoadedMotionModule("random", module, comfy.model_patcher.ModelPatcher(
        module, load_device=load, offload_device=load))

    dims = SD15_GUIDER_LAYERS if full_size else TINY_LAYER_DIMS
    parsed = parse_guider_state_dict(guider_weights(dims), "random guider", GUIDER_METADATA)
    guider = ContentGuider("random guider", parsed.format,
                           {slot: ContentSource(w, "random guider") for slot, w in parsed.sources.items()})
    gen = torch.Generator().manual_seed(2)
    features = ImageFeatures(torch.randn(1, 1024, generator=gen), torch.randn(1, 257, 1280, generator=gen),
                             torch.nn.functional.normalize(torch.randn(1, 512, generator=gen), dim=-1))
    blank = ImageFeatures(torch.zeros(1, 1024), torch.zeros(1, 257, 1280), torch.zeros(1, 512))
    kv = {slot: guider.source(slot).keys_values(features, blank, f"the {slot} image") for slot in GUIDER_SLOTS}

    cn_config = ControlNetConfig(model_channels=widths[0], channel_mult=tuple(unet_config["channel_mult"]),
                                 num_res_blocks=tuple(unet_config["num_res_blocks"]),
                                 transformer_depth=tuple(unet_config["transformer_depth"][::per_level]))
    cn_motion = randomise(MotionModule(MotionModuleConfig(channels=widths, down_layers=per_level, up_layers=0),
                                       ops=comfy.ops.manual_cast), seed=5)
    weights = randomise(VideoControlNet(cn_config), seed=6).state_dict()
    control = build_video_controlnet(weights, "random controlnet", [list(level) for level in cn_motion.down_blocks],
                                     cn_motion.mid_block, "random", cn_motion.config, ops=comfy.ops.manual_cast)
    control = control.to(device, dtype).eval()
    hint = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(7))  # IMAGE layout, one for all frames
    return Parts(nodes, patcher, motion, guider, kv, control, hint, frames, size)


def build(frames: int = 4, size: int = 64, *, motion: bool = True, control: bool = True,
          guider: tuple[str, ...] = GUIDER_SLOTS, **kwargs) -> DreaMovingModel:
    """One DreaMoving model (see :meth:`Parts.model`) from fresh random parts."""
    return parts(frames, size, **kwargs).model(motion=motion, control=control, guider=guider)
