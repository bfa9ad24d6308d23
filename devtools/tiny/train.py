"""Tiny models and data for the training tests, in the real formats.

* ``training_checkpoint(vae, size)``: an SD1.5-shaped single file (LDM keys, 768-wide cross-attention, CLIP-L text
  encoder keys, KL VAE). ``size="comfy"``: the tiny U-Net of ``checkpoint.TINY_UNET_CONFIG`` (320 wide, what ComfyUI
  detects as SD1.5) and the tiny checkpoint's CLIP-L; ``size="small"``: a 64-wide U-Net and a one-layer CLIP text
  encoder, for the tests that take many steps. U-Nets get healthy random weights (unit norms, 1/√fan-in layers) so
  gradients reach every block. ``vae="kl"``: a small KL autoencoder in the LDM layout (what diffusers'
  ``AutoencoderKL`` reads; ComfyUI only reads KL VAEs of SD's full widths); ``vae="taesd"``: the TAESD ComfyUI decodes
  with. The two VAE variants of a size share U-Net and text encoder bit for bit, so ComfyUI runs what was trained.
* ``components_dir(size)``: the shipped SD1.5 component configs with the tiny U-Net's, VAE's and text encoder's.
* ``small_motion_module()`` / ``small_controlnet()``: our motion module and an image ControlNet for the small U-Net.
* ``clip_dataset()`` / ``face_dataset()``: prepared data folders (``clips.jsonl`` / ``faces.jsonl``) with synthetic
  dance clips written by PyAV, their pose JSON and depth safetensors, face images, crops and ArcFace embeddings.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from devtools.tiny import cached, comfy_importable

VERSION = "v3"
SIZES = ("comfy", "small")
SMALL_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 1],
    num_heads=8, use_spatial_transformer=True, transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
)
TINY_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 64, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SMALL_TEXT_LAYERS = 1
CLIP_FRAMES, CLIP_SIZE, CLIP_FPS = 12, 80, 8


def _ldm_unet_config(size: str) -> dict:
    from devtools.tiny.checkpoint import TINY_UNET_CONFIG

    return TINY_UNET_CONFIG if size == "comfy" else SMALL_UNET_CONFIG


def diffusers_unet_config(size: str) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of the tiny U-Net of ``size`` (2 levels, attention in both)."""
    width = _ldm_unet_config(size)["model_channels"]
    return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
            "block_out_channels": [width, width], "center_input_sample": False, "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
            "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 1,
            "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
            "sample_size": 8, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}


def _healthy(module):
    """Weights a signal survives: norms 1/0, conv and linear ~ U(±1/√fan_in), biases 0."""
    import torch

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                bound = 1.0 / (m.weight[0].numel() ** 0.5)
                m.weight.uniform_(-bound, bound)
                if m.bias is not None:
                    m.bias.zero_()
    return module


def _unet_weights(size: str) -> dict:
    import torch

    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    torch.manual_seed(0)
    unet = openaimodel.UNetModel(**_ldm_unet_config(size), dtype=torch.float32, device="cpu")
    return _healthy(unet).state_dict()


def _kl_vae_ldm_weights() -> dict:
    """A random small diffusers AutoencoderKL (``TINY_VAE_CONFIG``) in the LDM key layout of SD checkpoints."""
    import torch
    from diffusers import AutoencoderKL

    import comfy.diffusers_convert

    torch.manual_seed(1)
    vae = AutoencoderKL(**{k: v for k, v in TINY_VAE_CONFIG.items() if not k.startswith("_")})
    return comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())


def _small_text_config() -> dict:
    from dreamoving_core.train.base import SD15_COMPONENTS

    config = json.loads((SD15_COMPONENTS / "text_encoder" / "config.json").read_text())
    return {**config, "num_hidden_layers": SMALL_TEXT_LAYERS}


def _text_weights(size: str) -> dict:
    """The text encoder under the key names of real SD1.5 files (``cond_stage_model.transformer.text_model.*``)."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from devtools.tiny.checkpoint import sd15_checkpoint

    prefix = "cond_stage_model.transformer."
    if size == "comfy":  # the tiny checkpoint's CLIP-L, saved with transformers 5's flat names
        flat = {k[len(prefix):]: v for k, v in load_file(str(sd15_checkpoint())).items() if k.startswith(prefix)}
    else:
        torch.manual_seed(2)
        flat = {k: v.half() for k, v in CLIPTextModel(CLIPTextConfig(**_small_text_config())).state_dict().items()}
    return {f"{prefix}{k if k.startswith('text_model.') else 'text_model.' + k}": v for k, v in flat.items()}


def training_checkpoint(vae: str = "kl", size: str = "comfy") -> Path:
    """The tiny training checkpoint of ``size`` with a KL VAE (``"kl"``, for diffusers) or TAESD (``"taesd"``, for
    ComfyUI)."""
    if vae not in ("kl", "taesd") or size not in SIZES:
        raise ValueError("vae must be 'kl' or 'taesd', size 'comfy' or 'small'")

    def build(path: Path) -> None:
        comfy_importable()
        from safetensors.torch import load_file, save_file

        from devtools.tiny.checkpoint import sd15_checkpoint

        weights = _text_weights(size)
        weights.update({f"model.diffusion_model.{k}": v.half() for k, v in _unet_weights(size).items()})
        if vae == "kl":
            weights.update({f"first_stage_model.{k}": v.half() for k, v in _kl_vae_ldm_weights().items()})
        else:
            weights.update({k: v for k, v in load_file(str(sd15_checkpoint())).items()
                            if k.startswith("first_stage_model.")})
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))

    return cached(f"train/{VERSION}/dreamoving_tiny_train_sd15_{size}_{vae}.safetensors", build)


def components_dir(size: str = "comfy") -> Path:
    """Diffusers component configs of the tiny training checkpoint of ``size`` (tokenizer: SD1.5's)."""
    from dreamoving_core.train.base import SD15_COMPONENTS

    def build(path: Path) -> None:
        shutil.copytree(SD15_COMPONENTS, path)
        (path / "unet" / "config.json").write_text(json.dumps(diffusers_unet_config(size), indent=2))
        (path / "vae" / "config.json").write_text(json.dumps(TINY_VAE_CONFIG, indent=2))
        if size == "small":
            (path / "text_encoder" / "config.json").write_text(json.dumps(_small_text_config(), indent=2))

    return cached(f"train/{VERSION}/components_{size}", build)


def small_motion_module() -> Path:
    """A random DreaMoving motion module (64 positions) for the small U-Net."""
    from devtools.tiny.motion import tiny_module
    from dreamoving_core.motion.format import save_motion_module

    width = SMALL_UNET_CONFIG["model_channels"]
    return cached(f"train/{VERSION}/small_motion.safetensors", lambda path: save_motion_module(
        tiny_module("dreamoving", channels=(width, width)), path))


def small_controlnet() -> Path:
    """A random image ControlNet (original ``control_model.*`` layout) for the small U-Net."""
    def build(path: Path) -> None:
        import torch
        from safetensors.torch import save_file

        from dreamoving_core.control.model import ControlNetConfig, VideoControlNet

        torch.manual_seed(3)
        width = SMALL_UNET_CONFIG["model_channels"]
        model = _healthy(VideoControlNet(ControlNetConfig(model_channels=width, channel_mult=(1, 1),
                                                          num_res_blocks=(1, 1), transformer_depth=(1, 1))))
        save_file({f"control_model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))

    return cached(f"train/{VERSION}/small_controlnet.safetensors", build)


# --------------------------------------------------------------------------------------------------- data


def dance_poses(frames: int = CLIP_FRAMES, size: int = CLIP_SIZE) -> list[dict]:
    """``POSE_KEYPOINT`` of the synthetic dancer (one OpenPose dict per frame, body keypoints only)."""
    import numpy as np

    from devtools.tiny.preprocess import dance_skeleton
    from dreamoving_core.preprocess.pose import NUM_BODY, Person, PoseFrame, to_pose_keypoint

    # OpenPose body index -> joint of the stick figure
    joints = {0: "head", 1: "neck", 2: "neck", 3: "r_elbow", 4: "r_hand", 5: "neck", 6: "l_elbow", 7: "l_hand",
              8: "hip", 9: "r_knee", 10: "r_foot", 11: "hip", 12: "l_knee", 13: "l_foot"}
    out = []
    for i in range(frames):
        skeleton = dance_skeleton(i / frames, size)
        body = np.zeros((NUM_BODY, 3), np.float32)
        for index, name in joints.items():
            body[index] = (*skeleton[name], 1.0)
        out.append(PoseFrame([Person(body=body)], size, size))
    return to_pose_keypoint(out)


def _write_clip(folder: Path, name: str, frames: int, caption: str, phase: int) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from devtools.tiny.preprocess import synthetic_dance_frames, synthetic_dance_video
    from dreamoving_core.data.manifest import ClipRecord

    clip = f"clips/{name}.mp4"
    synthetic_dance_video(folder / clip, frames=frames, size=CLIP_SIZE, fps=CLIP_FPS)
    poses = dance_poses(frames)
    (folder / f"clips/{name}.pose.json").write_text(json.dumps(poses))
    gray = synthetic_dance_frames(frames, CLIP_SIZE).mean(axis=-1)
    depth = np.where(gray > 150, 2.0, 6.0 + 4.0 * np.linspace(0, 1, CLIP_SIZE)[None, :, None] + 0.1 * phase)
    save_file({"depth": torch.from_numpy(depth.astype(np.float16))}, str(folder / f"clips/{name}.depth.safetensors"))
    return ClipRecord(clip=clip, source=f"source_{name}.mp4", start=0.0, end=frames / CLIP_FPS, fps=float(CLIP_FPS),
                      frames=frames, width=CLIP_SIZE, height=CLIP_SIZE, caption=caption,
                      pose=f"clips/{name}.pose.json", depth=f"clips/{name}.depth.safetensors")


def clip_dataset(clips: int = 2, frames: int = CLIP_FRAMES) -> Path:
    """A prepared folder with ``clips`` synthetic dance clips (``clips.jsonl``, clips, pose JSON, depth)."""
    from dreamoving_core.data.manifest import CLIPS_FILE, write_records

    def build(path: Path) -> None:
        (path / "clips").mkdir(parents=True)
        captions = ("a person dancing on a stage", "a dancer in a blue room", "someone dancing outdoors")
        records = [_write_clip(path, f"clip{i}", frames, captions[i % len(captions)], i) for i in range(clips)]
        write_records(path / CLIPS_FILE, records, append=False)

    return cached(f"train/{VERSION}/data_clips{clips}_f{frames}", build)


def face_dataset(images: int = 2) -> Path:
    """A prepared folder with ``images`` face images (``faces.jsonl``): a figure with a red "face", its 224×224
    face crop, a unit ArcFace embedding and a cloth crop (the first image has none)."""
    import cv2
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from dreamoving_core.data.manifest import FACES_FILE, FaceRecord, write_records

    def build(path: Path) -> None:
        (path / "faces").mkdir(parents=True)
        records = []
        rng = np.random.default_rng(0)
        for i in range(images):
            image = np.zeros((96, 80, 3), np.uint8)
            image[:] = (40 + 60 * i, 90, 200 - 50 * i)
            cv2.rectangle(image, (25, 10), (55, 40), (0, 0, 255), -1)  # the "face" (BGR red)
            cv2.rectangle(image, (20, 45), (60, 90), (30 + 100 * i, 200, 60), -1)  # the clothes
            names = {kind: f"faces/{i}_{kind}.png" for kind in ("image", "face", "cloth")}
            cv2.imwrite(str(path / names["image"]), image)
            cv2.imwrite(str(path / names["face"]), cv2.resize(image[10:40, 25:55], (224, 224)))
            cv2.imwrite(str(path / names["cloth"]), image[45:90, 20:60])
            embedding = rng.standard_normal(512).astype(np.float32)
            save_file({"embedding": torch.from_numpy(embedding / np.linalg.norm(embedding))},
                      str(path / f"faces/{i}_arcface.safetensors"))
            records.append(FaceRecord(image=names["image"], face=names["face"],
                                      arcface=f"faces/{i}_arcface.safetensors",
                                      cloth=names["cloth"] if i else None, caption=f"a person in outfit {i}"))
        write_records(path / FACES_FILE, records, append=False)

    return cached(f"train/{VERSION}/data_faces{images}", build)
