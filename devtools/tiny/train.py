"""Tiny models and data for the training tests, in the real formats.

* ``training_checkpoint(vae)``: an SD1.5-shaped single file with the tiny U-Net of ``checkpoint.TINY_UNET_CONFIG``
  (healthy random weights: unit norms, 1/√fan-in layers, so gradients reach every block), the tiny checkpoint's
  CLIP-L text encoder and, for ``vae="kl"``, a small KL autoencoder in the LDM layout (what diffusers'
  ``AutoencoderKL`` reads; ComfyUI only reads KL VAEs of SD's full widths) or, for ``vae="taesd"``, the TAESD that
  ComfyUI decodes with. Both share U-Net and text encoder bit for bit, so ComfyUI runs (over HTTP) what was trained.
* ``components_dir()``: the shipped SD1.5 component configs with the tiny U-Net's and VAE's.
* ``clip_dataset()`` / ``face_dataset()``: prepared data folders (``clips.jsonl`` / ``faces.jsonl``) with synthetic
  dance clips written by PyAV, their pose JSON and depth safetensors, face images, crops and ArcFace embeddings.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from devtools.tiny import cached, comfy_importable

VERSION = "v2"
TINY_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 64, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TINY_DIFFUSERS_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 320],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 1, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 8,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
CLIP_FRAMES, CLIP_SIZE, CLIP_FPS = 12, 80, 8


def _healthy_unet():
    """The tiny LDM U-Net with weights a signal survives: norms 1/0, conv and linear ~ U(±1/√fan_in), biases 0."""
    import torch

    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    from devtools.tiny.checkpoint import TINY_UNET_CONFIG

    torch.manual_seed(0)
    unet = openaimodel.UNetModel(**TINY_UNET_CONFIG, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                bound = 1.0 / (module.weight[0].numel() ** 0.5)
                module.weight.uniform_(-bound, bound)
                if module.bias is not None:
                    module.bias.zero_()
    return unet


def _kl_vae_ldm_weights() -> dict:
    """A random small diffusers AutoencoderKL (``TINY_VAE_CONFIG``) in the LDM key layout of SD checkpoints."""
    import torch
    from diffusers import AutoencoderKL

    import comfy.diffusers_convert

    torch.manual_seed(1)
    config = {k: v for k, v in TINY_VAE_CONFIG.items() if not k.startswith("_")}
    vae = AutoencoderKL(**config)
    return comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())


def training_checkpoint(vae: str = "kl") -> Path:
    """The tiny training checkpoint with a KL VAE (``"kl"``, for diffusers) or TAESD (``"taesd"``, for ComfyUI)."""
    if vae not in ("kl", "taesd"):
        raise ValueError("vae must be 'kl' or 'taesd'")

    def build(path: Path) -> None:
        comfy_importable()
        from safetensors.torch import load_file, save_file

        from devtools.tiny.checkpoint import sd15_checkpoint

        base = load_file(str(sd15_checkpoint()))
        # the text encoder under the key names of real SD1.5 files (the tiny checkpoint has transformers 5's flat ones)
        prefix = "cond_stage_model.transformer."
        weights = {k.replace(prefix, f"{prefix}text_model.") if not k.startswith(f"{prefix}text_model.") else k: v
                   for k, v in base.items() if k.startswith(prefix)}
        weights.update({f"model.diffusion_model.{k}": v.half() for k, v in _healthy_unet().state_dict().items()})
        if vae == "kl":
            weights.update({f"first_stage_model.{k}": v.half() for k, v in _kl_vae_ldm_weights().items()})
        else:
            weights.update({k: v for k, v in base.items() if k.startswith("first_stage_model.")})
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))

    return cached(f"train/{VERSION}/dreamoving_tiny_train_sd15_{vae}.safetensors", build)


def components_dir() -> Path:
    """Diffusers component configs of the tiny training checkpoint (text encoder and tokenizer: SD1.5's)."""
    from dreamoving_core.train.base import SD15_COMPONENTS

    def build(path: Path) -> None:
        shutil.copytree(SD15_COMPONENTS, path)
        (path / "unet" / "config.json").write_text(json.dumps(TINY_DIFFUSERS_UNET_CONFIG, indent=2))
        (path / "vae" / "config.json").write_text(json.dumps(TINY_VAE_CONFIG, indent=2))

    return cached(f"train/{VERSION}/components", build)


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
