"""Training (``dreamoving_core.train``) on tiny SD1.5-shaped models and synthetic data, on the CPU.

The four stages run in a chain as users run them (long_frame → video_controlnet → expression; content_guider from a
guider file) on the ComfyUI-shaped tiny U-Net, two steps each: only the stage's trained module changes, and its file
loads in its loader node over HTTP and changes the video. What is trained is what is run: diffusers' U-Net with our
modules predicts the noise ComfyUI's U-Net predicts when patched by our nodes. The tests that need many steps or
processes (over-fitting, resume, two processes) use the small 64-wide variant.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.utils.data import default_collate

from devtools.server import PACK_DIR
from devtools.tiny import content_guider as tiny_guider
from devtools.tiny.controlnet import sd15_controlnet, video_controlnet
from devtools.tiny.motion import bad_file, motion_module
from devtools.tiny.train import (clip_dataset, components_dir, face_dataset, small_controlnet, small_motion_module,
                                 training_checkpoint)
from dreamoving_core.errors import InputMismatchError, ModelFormatError
from dreamoving_core.io import load_state_dict, read_metadata
from dreamoving_core.train import ConfigError, Trainer, load_config
from dreamoving_core.train.base import file_sha256
from tests.graphs import base_graph, run_latent

os.environ["HF_HUB_OFFLINE"] = "1"  # every file the training reads is local: a hub request would fail the test
FRAMES = 2


def overrides(stage: str, out: Path, size: str = "comfy", **extra) -> dict:
    """Settings of a tiny CPU run of ``stage`` (64² frames, ``FRAMES`` frames, two steps, no validation)."""
    models = {"checkpoint": str(training_checkpoint("kl", size)), "components": str(components_dir(size))}
    data = {"root": str(clip_dataset()), "resolution": 64, "frames": FRAMES, "frame_stride": 1, "workers": 0}
    if stage == "content_guider":
        models |= {"clip_vision": str(tiny_guider.clip_vision_file(1))}
        data = {"root": str(face_dataset()), "resolution": 64, "workers": 0}
    settings = {"models": models, "data": data, "steps": 2, "mixed_precision": "no", "cpu": True,
                "output_dir": str(out), "validation": {"every": 0}, "log_every": 1, "checkpoint_every": 1000,
                "guider": {"perceiver_depth": 1, "perceiver_dim": 64}}
    for key, value in extra.items():
        if isinstance(value, dict):
            settings[key] = {**settings.get(key, {}), **value}
        else:
            settings[key] = value
    return settings


def digests(module: torch.nn.Module) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()}


class RecordingScorer:
    """The scorer seam's trivial implementation: remembers what it was given, returns two numbers."""

    def __init__(self):
        self.calls = []

    def __call__(self, frames, *, driving, face):
        self.calls.append(SimpleNamespace(frames=frames, driving=driving, face=face))
        return {"mean_brightness": float(frames.mean()), "driving_frames": float(len(driving or []))}


# ------------------------------------------------------------------------------------------- the stage chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """``chain(stage)``: the tiny run of ``stage`` (its trainer, the digests before, its result), run once."""
    runs: dict = {}
    root = tmp_path_factory.mktemp("train_chain")

    def run(stage: str):
        if stage in runs:
            return runs[stage]
        extra: dict = {}
        if stage == "long_frame":  # from AnimateDiff v1 (24 positions), as the paper starts from mm_sd_v15.ckpt
            extra["models"] = {"motion_module": str(motion_module("v1", "ckpt"))}
        elif stage == "video_controlnet":
            extra = {"models": {"motion_module": str(run("long_frame").result.output),
                                "controlnet": str(sd15_controlnet("pth"))},
                     "gradient_checkpointing": True, "validation": {"every": 2, "steps": 2}}
        elif stage == "expression":
            extra["models"] = {"motion_module": str(run("long_frame").result.output),
                               "controlnet": str(run("video_controlnet").result.output)}
        else:
            extra["models"] = {"content_guider": str(tiny_guider.guider_file())}
        scorer = RecordingScorer()
        trainer = Trainer(load_config(stage, None, [overrides(stage, root / stage, **extra)]), scorer)
        frozen = {name: digests(module) for name, module in trainer.stage.frozen.items()}
        trainable = {k: v.detach().clone() for k, v in trainer.stage.trainable.state_dict().items()}
        runs[stage] = SimpleNamespace(trainer=trainer, frozen=frozen, trainable=trainable, result=trainer.run(),
                                      scorer=scorer, config=trainer.config)
        return runs[stage]

    return run


@pytest.mark.parametrize("stage", ["long_frame", "video_controlnet", "expression", "content_guider"])
def test_a_stage_changes_only_its_trained_module_and_every_frozen_tensor_stays_bit_identical(chain, stage):
    run = chain(stage)
    stage_ = run.trainer.stage
    trained = stage_.trainable
    assert {"unet", "vae", "text_encoder"} <= set(stage_.frozen)
    expected_frozen = {"long_frame": set(), "video_controlnet": {"motion_module"}, "expression": {"controlnet"},
                       "content_guider": {"clip_vision"}}[stage]
    assert set(stage_.frozen) - {"unet", "vae", "text_encoder"} == expected_frozen
    for name, module in stage_.frozen.items():
        assert not any(p.requires_grad for p in module.parameters()), name
        assert digests(module) == run.frozen[name], f"frozen {name} changed"
    assert all(p.requires_grad for p in trained.parameters())
    params = dict(trained.named_parameters())
    unchanged = [k for k, v in trained.state_dict().items() if k in params and torch.equal(v, run.trainable[k])]
    assert not unchanged, f"trained parameters that did not change: {unchanged[:5]}"
    buffers = [k for k in run.trainable if k not in params]  # positional tables are fixed, not trained
    assert all(torch.equal(trained.state_dict()[k], run.trainable[k]) for k in buffers)
    assert list(dict(run.trainer.stage.denoiser.named_children())) == ["trainable"]
    assert run.result.steps == 2 and len(run.result.losses) == 2 and all(0 < x < 10 for x in run.result.losses)


def test_outputs_are_our_formats_with_training_metadata_and_load_in_the_core_loaders(chain):
    from dreamoving_core.control.format import detect_layout, load_video_controlnet
    from dreamoving_core.guider.model import load_content_guider
    from dreamoving_core.motion.format import load_motion_module

    checkpoint = training_checkpoint("kl")
    for stage, fmt in (("long_frame", "dreamoving_motion_module"), ("video_controlnet", "dreamoving_video_controlnet"),
                       ("expression", "dreamoving_motion_module"), ("content_guider", "dreamoving_content_guider")):
        run = chain(stage)
        path = run.result.output
        meta = read_metadata(path)
        assert meta["format"] == fmt and meta["stage"] == stage and meta["steps"] == "2"
        assert float(meta["learning_rate"]) == run.config.optimizer.lr
        assert meta["base_checkpoint"] == checkpoint.name
        assert meta["base_checkpoint_sha256"] == file_sha256(checkpoint)
        manifest = Path(meta["data_manifest"])
        assert manifest.name in ("clips.jsonl", "faces.jsonl") and meta["data_manifest_sha256"] == file_sha256(manifest)
        assert json.loads(meta["training_config"])["stage"] == stage
        assert (path.parent / "checkpoints" / "step-000002" / path.name).is_file()
    motion = load_motion_module(chain("long_frame").result.output)
    assert motion.config.positional_length == 64 and motion.config.version == "dreamoving"
    controlnet = load_video_controlnet(chain("video_controlnet").result.output)
    assert controlnet.has_motion and detect_layout(load_state_dict(chain("video_controlnet").result.output), "x") == \
        "video"
    assert set(load_content_guider(chain("content_guider").result.output).sources) == {"face", "cloth"}


def test_validation_writes_frames_and_logs_the_scorers_numbers_beside_the_loss(chain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = chain("video_controlnet")
    (call,) = run.scorer.calls
    assert call.frames.shape == (FRAMES, 64, 64, 3) and 0 <= call.frames.min() and call.frames.max() <= 1
    assert call.frames.std() > 0.01, "validation frames must not be flat"
    assert len(call.driving) == FRAMES and call.driving[0]["canvas_width"] == 64
    pngs = sorted((Path(run.config.output_dir) / "validation" / "step-000002").glob("frame_*.png"))
    assert len(pngs) == FRAMES
    events = EventAccumulator(str(next((Path(run.config.output_dir) / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/frames_per_second", "val/mean_brightness", "val/driving_frames"} <= \
        scalars
    assert events.Scalars("val/driving_frames")[0].value == FRAMES
    assert "val/frames" in events.Tags()["images"]


# ----------------------------------------------------------------------------------- what is trained is run


@pytest.fixture(scope="module")
def comfy_glue():
    from devtools.tiny import pack_nodes

    return {topic: pack_nodes(topic) for topic in ("motion", "video_controlnet", "content_guider")}


def test_what_is_trained_is_what_is_run_diffusers_with_our_modules_predicts_comfyuis_noise(comfy_glue):
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import folder_paths

    from dreamoving_core.control.format import load_video_controlnet
    from dreamoving_core.guider.model import ImageFeatures, load_content_guider
    from dreamoving_core.motion.format import load_motion_module
    from dreamoving_core.train.base import load_base, read_checkpoint
    from dreamoving_core.train.unet import DreaMovingUNet, GuidanceTerm

    frames, sigma_index = 4, 499
    base = load_base(read_checkpoint(training_checkpoint("kl")), "tiny", components_dir())
    ids = base.tokenizer(["a person dancing"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = base.text_encoder(ids)[0]
    comfy_model, comfy_clip, *_ = comfy.sd.load_checkpoint_guess_config(
        str(training_checkpoint("taesd")), output_vae=False, output_clip=True)
    tokens = comfy_clip.tokenize("a person dancing")
    torch.testing.assert_close(comfy_clip.encode_from_tokens(tokens), text, atol=1e-4, rtol=1e-4)

    motion_path, control_path, guider_path = motion_module("dreamoving"), video_controlnet(), tiny_guider.guider_file()
    folder_paths.folder_names_and_paths["dreamoving_motion"] = ([str(motion_path.parent)], {".safetensors"})
    model = comfy_glue["motion"].apply_motion(comfy_model, comfy_glue["motion"].load_for_comfy(
        motion_path.name, 64, "sinusoid"), 1.0)
    guider = load_content_guider(guider_path)
    g = torch.Generator().manual_seed(0)
    features = {"face": ImageFeatures(None, torch.randn(1, 257, 1280, generator=g), torch.randn(1, 512, generator=g)),
                "cloth": ImageFeatures(None, torch.randn(1, 257, 1280, generator=g))}
    blank = ImageFeatures(None, torch.zeros(1, 257, 1280), torch.zeros(1, 512))
    alphas = {"face": 0.8, "cloth": 0.6}
    for slot, f in features.items():
        kv = guider.source(slot).keys_values(f, blank)
        model = comfy_glue["content_guider"].apply_guidance(model, slot, guider, kv, alphas[slot], 0.0, 1.0)
    controlnet = load_video_controlnet(control_path, dtype=torch.float32)
    hint = torch.rand(frames, 3, 64, 64, generator=g)
    vc = comfy_glue["video_controlnet"]
    control = vc.VideoControl(controlnet, control_path.name, load_device=comfy.model_management.get_torch_device())
    positive, negative = vc.apply_control([[text, {}]], [[text * 0, {}]], control, hint.movedim(1, -1), 1.0, (0.0, 1.0))

    captured = {}

    def capture(apply_model, args):
        captured["x"], captured["out"] = args["input"], apply_model(args["input"], args["timestep"], **args["c"])
        return captured["out"]

    model = model.clone()
    model.set_model_unet_function_wrapper(capture)
    sigma = comfy_model.get_model_object("model_sampling").sigmas[sigma_index]
    noise = torch.randn(frames, 4, 8, 8, generator=g)
    comfy.sample.sample(model, noise, 1, 1.0, "euler", "normal", positive, negative, torch.zeros_like(noise),
                        sigmas=torch.stack([sigma, torch.zeros(())]), disable_pbar=True)
    comfy_eps = (captured["x"] - captured["out"]) / sigma

    motion = load_motion_module(motion_path).float()
    ours = DreaMovingUNet(base.unet, motion, guided=True)
    x_t = captured["x"] / (sigma ** 2 + 1) ** 0.5
    timesteps = torch.full((frames,), sigma_index)
    context = text.expand(frames, -1, -1)
    with torch.no_grad():
        residuals = controlnet(x_t, hint, timesteps.float(), context, frames)
        guidance = [GuidanceTerm(alphas[s], guider.sources[s], guider.sources[s].project(f))
                    for s, f in features.items()]
        eps = ours(x_t, timesteps, context, frames, control=residuals, guidance=guidance)
        bare = base.unet(x_t, timesteps, context).sample
    ours.remove()
    assert (eps - bare).abs().mean() > 0.05 * bare.abs().mean(), "motion, control and guidance must all act"
    torch.testing.assert_close(eps, comfy_eps, atol=2e-4, rtol=2e-4)


def test_motion_blocks_sit_where_diffusers_animatediff_puts_them():
    """Against diffusers' UNetMotionModel on SD1.5's topology (a plain lowest level, three layers per up level),
    with its motion group norms taken per frame as AnimateDiff does (diffusers' spans a video's frames)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from dreamoving_core.motion.format import animatediff_state_dict
    from dreamoving_core.motion.model import MotionModule, MotionModuleConfig
    from dreamoving_core.train.unet import DreaMovingUNet

    torch.manual_seed(0)
    widths, frames = (32, 64, 64, 64), 4
    unet = UNet2DConditionModel(block_out_channels=widths, layers_per_block=2, cross_attention_dim=64,
                                attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=8).eval().requires_grad_(False)
    motion = MotionModule(MotionModuleConfig(channels=widths, positional_length=32))
    with torch.no_grad():
        for name, p in motion.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    adapter = MotionAdapter(block_out_channels=widths, motion_layers_per_block=2, motion_max_seq_length=32,
                            motion_mid_block_layers_per_block=1, use_motion_mid_block=True)
    names = ((".norms.0", ".norm1"), (".norms.1", ".norm2"), (".ff_norm", ".norm3"), (".attention_blocks.0", ".attn1"),
             (".attention_blocks.1", ".attn2"), (".temporal_transformer", ""))
    weights = {}
    for key, value in animatediff_state_dict(motion).items():
        if "pos_encoder" not in key:  # diffusers computes the same sinusoid
            for old, new in names:
                key = key.replace(old, new)
            weights[key] = value
    assert not adapter.load_state_dict(weights, strict=False).unexpected_keys
    reference = UNetMotionModel.from_unet2d(unet, adapter).eval()

    class PerFrameNorm(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, x):  # (B, C, F, H, W)
            b, c, f, h, w = x.shape
            y = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
            return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

    for name, module in reference.named_modules():
        if name.endswith("motion_modules"):
            for block in module:
                block.norm = PerFrameNorm(block.norm)
    x = torch.randn(2 * frames, 4, 8, 8)
    t = torch.tensor([300] * frames + [700] * frames)
    context = torch.randn(2 * frames, 7, 64)
    ours = DreaMovingUNet(unet, motion)
    with torch.no_grad():
        got = ours(x, t, context, frames)
        expected = reference(x.reshape(2, frames, 4, 8, 8).transpose(1, 2), t[::frames], context).sample
        ours.remove()
        bare = unet(x, t, context).sample
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(2 * frames, 4, 8, 8), atol=1e-5, rtol=1e-5)
    assert (got - bare).abs().max() > 0.1
    assert torch.equal(unet(x, t, context).sample, bare), "remove() must leave the plain U-Net"

    grads = []  # the lowest level's motion blocks run inside diffusers' checkpointed resnets
    for checkpointing in (False, True):
        motion.zero_grad()
        ours = DreaMovingUNet(unet, motion)
        ours.checkpointing = checkpointing
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        ours(x, t, context, frames).square().mean().backward()
        ours.remove()
        grads.append([p.grad.clone() for p in motion.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------- in ComfyUI, over HTTP


@pytest.fixture(scope="module")
def http_models(install_model, chain):
    names = {"checkpoint": install_model(training_checkpoint("taesd"), "checkpoints"),
             "initial_motion": install_model(motion_module("v1", "ckpt"), "animatediff_models", "train_initial_v1.ckpt"),
             "controlnet": install_model(sd15_controlnet("pth"), "controlnet", "train_initial_control.pth"),
             "initial_guider": install_model(tiny_guider.guider_file(), "dreamoving/content_guider",
                                             "train_initial_guider.safetensors"),
             "clip": install_model(tiny_guider.clip_vision_file(1), "clip_vision", "train_clip_vision_1l.safetensors")}
    install_model(tiny_guider.insightface_root() / "models" / "buffalo_l", "insightface/models", "buffalo_l")
    folders = {"long_frame": "dreamoving/motion", "expression": "dreamoving/motion",
               "video_controlnet": "dreamoving/video_controlnet", "content_guider": "dreamoving/content_guider"}
    for stage, folder in folders.items():
        names[stage] = install_model(chain(stage).result.output, folder, f"train_{stage}.safetensors")
    return names


def generate(comfy, models: dict, motion: str | None = None, controlnet: tuple[str, str] | None = None,
             guider: str | None = None) -> torch.Tensor:
    """4 frames from the training checkpoint's U-Net (TAESD twin) with the given files through the loader nodes."""
    g, refs = base_graph(models["checkpoint"], frames=4, steps=2, prefix="train")
    model, positive, negative = refs["model"], refs["positive"], refs["negative"]
    if motion is not None:
        loaded = g.node("DreaMovingLoadMotionModule", model_name=motion, positional_length=64, pe_extension="sinusoid")
        model = g.node("DreaMovingApplyMotionModule", model=model, motion_module=loaded[0], motion_scale=1.0)[0]
    if controlnet is not None:
        loaded = g.node("DreaMovingLoadVideoControlNet", controlnet_name=controlnet[0], motion_module=controlnet[1])
        hints = g.node("EmptyImage", width=64, height=64, batch_size=4, color=0x20A0F0)
        applied = g.node("DreaMovingApplyVideoControlNet", positive=positive, negative=negative,
                         video_controlnet=loaded[0], images=hints[0], strength=1.0, start_percent=0.0,
                         end_percent=1.0)
        positive, negative = applied[0], applied[1]
    if guider is not None:
        loaded = g.node("DreaMovingLoadContentGuider", guider_name=guider)
        clip = g.node("DreaMovingLoadOpenClipVision", clip_name=models["clip"])
        face = g.node("EmptyImage", width=64, height=64, batch_size=1, color=0xFF0000)
        cloth = g.node("EmptyImage", width=64, height=64, batch_size=1, color=0x3366CC)
        insight = g.node("DreaMovingLoadInsightFace", pack="buffalo_l", provider="auto")
        model = g.node("DreaMovingContentGuiderFace", model=model, guider=loaded[0], face_image=face[0],
                       clip_vision=clip[0], alpha_face=1.0, start_percent=0.0, end_percent=1.0,
                       insightface=insight[0])[0]
        model = g.node("DreaMovingContentGuiderCloth", model=model, guider=loaded[0], cloth_image=cloth[0],
                       clip_vision=clip[0], alpha_cloth=1.0, start_percent=0.0, end_percent=1.0)[0]
    g.set(refs["sampler"], model=model, positive=positive, negative=negative)
    return run_latent(comfy, g, refs["save"])


@pytest.mark.parametrize("stage", ["long_frame", "video_controlnet", "expression", "content_guider"])
def test_each_stages_file_loads_in_its_loader_node_and_changes_the_video(comfy, http_models, stage):
    m = http_models
    if stage == "long_frame":
        initial, trained = generate(comfy, m, motion=m["initial_motion"]), generate(comfy, m, motion=m[stage])
    elif stage == "video_controlnet":
        initial = generate(comfy, m, motion=m["long_frame"], controlnet=(m["controlnet"], m["long_frame"]))
        trained = generate(comfy, m, motion=m["long_frame"], controlnet=(m[stage], "none"))
    elif stage == "expression":
        initial = generate(comfy, m, motion=m["long_frame"], controlnet=(m["video_controlnet"], "none"))
        trained = generate(comfy, m, motion=m[stage], controlnet=(m["video_controlnet"], "none"))
    else:
        initial, trained = generate(comfy, m, guider=m["initial_guider"]), generate(comfy, m, guider=m[stage])
    assert initial.shape == trained.shape == (4, 4, 8, 8)
    assert torch.isfinite(trained).all() and (trained - initial).abs().max() > 1e-3


# ---------------------------------------------------------------------- learning, resuming, two processes


def probe_loss(trainer: Trainer, samples: int = 4) -> float:
    """The loss on a fixed set of samples, noises and timesteps (no training)."""
    losses = []
    with torch.no_grad():
        for i in range(samples):
            batch = default_collate([trainer.dataset[(0, 1000 + i)]])
            losses.append(trainer.loss(trainer.stage.denoiser, batch, torch.Generator().manual_seed(i)).item())
    return sum(losses) / len(losses)


def test_overfitting_one_clip_brings_the_loss_well_below_its_start(tmp_path):
    settings = overrides("long_frame", tmp_path, size="small", steps=20,
                         models={"motion_module": str(small_motion_module())},
                         data={"root": str(clip_dataset(clips=1))}, optimizer={"lr": 3e-3, "weight_decay": 0.0})
    trainer = Trainer(load_config("long_frame", None, [settings]))
    before = probe_loss(trainer)
    trainer.run()
    after = probe_loss(trainer)
    assert after < 0.6 * before, (before, after)


def test_resuming_a_saved_state_continues_with_the_same_losses_and_weights(tmp_path):
    settings = overrides("long_frame", tmp_path / "whole", size="small", steps=4, checkpoint_every=2,
                         models={"motion_module": str(small_motion_module())}, ema={"enabled": True, "decay": 0.9})
    whole = Trainer(load_config("long_frame", None, [settings])).run()
    saved = tmp_path / "whole" / "checkpoints" / "step-000002"
    assert (saved / "training_state.json").is_file() and (saved / "ema.safetensors").is_file()
    resumed_settings = dict(settings, output_dir=str(tmp_path / "resumed"))
    resumed = Trainer(load_config("long_frame", None, [resumed_settings])).run(resume=saved)
    assert resumed.steps == 4 and len(resumed.losses) == 2
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(whole.losses[2:]), atol=1e-6, rtol=1e-6)
    assert resumed.weights_sha256 == whole.weights_sha256
    a, b = load_state_dict(whole.output), load_state_dict(resumed.output)  # EMA weights, exported
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_the_cpu_finish_with_identical_weights(tmp_path):
    settings = overrides("long_frame", tmp_path / "ddp", size="small", models={"motion_module": str(
        small_motion_module())})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(settings))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "dreamoving_core.train", "long_frame", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(PACK_DIR), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, cwd=PACK_DIR, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    reports = re.findall(r"\[rank (\d+)/(\d+)\] trained weights sha256 ([0-9a-f]{64})", out.stdout)
    assert sorted(rank for rank, _, _ in reports) == ["0", "1"], out.stdout[-3000:]
    assert {world for _, world, _ in reports} == {"2"}
    assert len({digest for _, _, digest in reports}) == 1, reports
    assert (tmp_path / "ddp" / "dreamoving_motion_long_frame.safetensors").is_file()


@pytest.mark.parametrize("stage", ["video_controlnet", "content_guider"])
def test_gradient_checkpointing_gives_the_same_step(tmp_path, stage):
    models = {} if stage == "content_guider" else {"motion_module": str(small_motion_module()),  # a new guider
                                                     "controlnet": str(small_controlnet())}
    results = []
    for on in (False, True):
        settings = overrides(stage, tmp_path / str(on), size="small", steps=1, gradient_checkpointing=on,
                             models=models)
        trainer = Trainer(load_config(stage, None, [settings]))
        results.append((trainer.run(), trainer.stage.trainable.state_dict()))
    (plain, weights), (checkpointed, again) = results
    assert plain.losses == checkpointed.losses
    for key, value in weights.items():
        torch.testing.assert_close(again[key], value, atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.gpu
@pytest.mark.parametrize("stage, precision, adam_8bit", [("video_controlnet", "bf16", False),
                                                         ("content_guider", "fp16", False),
                                                         ("expression", "bf16", True)])
def test_mixed_precision_and_8bit_adam_train_on_cuda(tmp_path, stage, precision, adam_8bit):
    """Each run in its own process (accelerate keeps one precision per process), from the command line."""
    import importlib.util

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if adam_8bit and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("optimizer.adam_8bit needs bitsandbytes")
    models = {} if stage == "content_guider" else {"motion_module": str(small_motion_module()),
                                                   "controlnet": str(small_controlnet())}
    if stage == "expression":  # the frozen Video ControlNet: a small one with motion blocks, trained here first
        first = overrides("video_controlnet", tmp_path / "vcn", size="small", steps=1, models=models)
        models["controlnet"] = str(Trainer(load_config("video_controlnet", None, [first])).run().output)
    settings = overrides(stage, tmp_path / "run", size="small", steps=3, mixed_precision=precision, cpu=False,
                         gradient_checkpointing=True, models=models, optimizer={"adam_8bit": adam_8bit})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "PYTHONPATH": str(PACK_DIR), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "dreamoving_core.train", stage, "--config", str(config)],
                         cwd=PACK_DIR, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    weights = load_state_dict(next((tmp_path / "run").glob("dreamoving_*.safetensors")))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


# --------------------------------------------------------------------------------- configs and clear errors


def test_shipped_configs_hold_the_papers_recipe():
    expected = {  # stage: (lr, resolution, steps, batch, frames, noise schedule)
        "content_guider": (1e-4, 512, 100_000, 8, 1, "scaled_linear"),
        "long_frame": (1e-4, 256, 10_000, 1, 64, "linear"),
        "video_controlnet": (1e-4, 352, 25_000, 1, 64, "linear"),
        "expression": (5e-5, 512, 20_000, 1, 64, "linear"),
    }
    for stage, (lr, resolution, steps, batch, frames, schedule) in expected.items():
        config = load_config(stage)
        got = (config.optimizer.lr, config.data.resolution, config.steps, config.batch_size, config.data.frames,
               config.noise_schedule)
        assert got == (lr, resolution, steps, batch, frames, schedule), stage
        assert config.optimizer.weight_decay == 1e-2 and config.positional_length == 64
    guider = load_config("content_guider")
    assert (guider.data.drop_text, guider.data.drop_image, guider.data.drop_both) == (0.05, 0.05, 0.05)


def test_settings_layer_shipped_file_user_file_then_command_line(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("data:\n  root: /data/prepared\n  frames: 16\noptimizer:\n  lr: 2.0e-5\n")
    config = load_config("long_frame", user, ["optimizer.lr=3e-5", "steps=7", "ema.enabled=true"])
    assert (config.data.root, config.data.frames, config.optimizer.lr, config.steps, config.ema.enabled) == \
        ("/data/prepared", 16, 3e-5, 7, True)
    assert config.data.resolution == 256 and config.optimizer.weight_decay == 1e-2  # untouched: the shipped recipe
    with pytest.raises(ConfigError, match=r"unknown setting 'optimizer.learning_rate'; known settings of optimizer: "
                                          r"lr, weight_decay"):
        load_config("long_frame", None, ["optimizer.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="steps must be an integer, got 'many'"):
        load_config("long_frame", None, ["steps=many"])
    with pytest.raises(ConfigError, match="data.resolution must be a positive multiple of 8.*got 300"):
        load_config("long_frame", None, ["data.resolution=300"])
    with pytest.raises(ConfigError, match="data.frames \\(80\\) is more than the motion blocks' positional_length"):
        load_config("long_frame", None, ["data.frames=80"])
    user.write_text("stage: expression\n")
    with pytest.raises(ConfigError, match="the config is for stage 'expression' but stage 'long_frame'"):
        load_config("long_frame", user)


def test_shipped_deepspeed_zero2_config_is_read_by_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = PACK_DIR / "dreamoving_core" / "train" / "configs"
    cluster = load_config_from_file(str(folder / "accelerate_deepspeed_zero2.yaml"))
    assert str(cluster.distributed_type).endswith("DEEPSPEED")
    assert (PACK_DIR / cluster.deepspeed_config["deepspeed_config_file"]).resolve() == \
        (folder / "deepspeed_zero2.json").resolve()
    assert json.loads((folder / "deepspeed_zero2.json").read_text())["zero_optimization"]["stage"] == 2


@pytest.fixture
def no_base_loading(monkeypatch):
    """Fails the test if the base model is read: the error must come before any model reaches a device."""
    import dreamoving_core.train.trainer as trainer

    def refuse(*_args, **_kwargs):
        raise AssertionError("the base checkpoint was read before the setup error was found")

    monkeypatch.setattr(trainer, "read_checkpoint", refuse)
    monkeypatch.setattr(trainer, "load_base", refuse)


def _setup(stage: str, tmp_path: Path, **extra) -> Trainer:
    return Trainer(load_config(stage, None, [overrides(stage, tmp_path / "out", **extra)]))


def test_missing_manifest_clip_files_and_hints_are_named_before_any_model_is_loaded(tmp_path, no_base_loading):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputMismatchError, match=r"manifest '.*clips.jsonl' does not exist; run `python -m "
                                                 r"dreamoving_core.data prepare`"):
        _setup("long_frame", tmp_path, data={"root": str(empty)})
    data = tmp_path / "data"
    shutil.copytree(clip_dataset(), data)
    (data / "clips" / "clip1.mp4").unlink()
    with pytest.raises(InputMismatchError, match=r"clip files missing: clips/clip1.mp4 \(of 2\)"):
        _setup("long_frame", tmp_path, data={"root": str(data)})
    rows = [json.loads(line) for line in (clip_dataset() / "clips.jsonl").read_text().splitlines()]
    rows[0]["depth"] = None
    shutil.copy(clip_dataset() / "clips" / "clip1.mp4", data / "clips" / "clip1.mp4")
    (data / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputMismatchError, match=r"depth hints missing for clips/clip0.mp4 \(of 2\)"):
        _setup("video_controlnet", tmp_path, data={"root": str(data), "hint": "depth"})


def test_clips_shorter_than_the_frame_count_are_listed(tmp_path, no_base_loading):
    with pytest.raises(InputMismatchError, match=r"2 clips are shorter than the 15 frames that data.frames=8 at "
                                                 r"data.frame_stride=2 need: clips/clip0.mp4 \(12 frames\)"):
        _setup("long_frame", tmp_path, data={"frames": 8, "frame_stride": 2})


def test_a_base_checkpoint_that_is_not_sd15_is_refused_naming_what_it_is(tmp_path, no_base_loading):
    from safetensors.torch import save_file

    sd2 = tmp_path / "sd21.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)},
              str(sd2))
    cases = [(sd2, r"'sd21.safetensors' is an SD2.x checkpoint \(cross-attention reads \[1024\]-wide"),
             (motion_module("v2", "safetensors"), r"is a motion module \(no model.diffusion_model.\* U-Net weights\)"),
             (training_checkpoint("taesd"), r"has no KL autoencoder .*\(it has a TAESD")]
    for path, message in cases:
        with pytest.raises(ModelFormatError, match=message):
            _setup("long_frame", tmp_path, models={"checkpoint": str(path)})


@pytest.mark.parametrize("kind, message", [
    ("motion_lora", "is a motion LoRA"), ("controlnet", "is a ControlNet, not a motion module"),
    ("sdxl", "is an SDXL motion module"), ("small", r"is made for a U-Net with 2 levels of widths 64/64")])
def test_an_initial_motion_module_of_the_wrong_kind_is_refused(tmp_path, no_base_loading, kind, message):
    path = small_motion_module() if kind == "small" else bad_file(kind)
    with pytest.raises(InputMismatchError if kind == "small" else ModelFormatError, match=message):
        _setup("long_frame", tmp_path, models={"motion_module": str(path)})


def test_stage_inputs_and_devices_that_cannot_work_are_refused_up_front(tmp_path, no_base_loading):
    with pytest.raises(ConfigError, match="models.controlnet is not set; the video_controlnet stage needs an image "
                                          "ControlNet"):
        _setup("video_controlnet", tmp_path, models={"motion_module": str(motion_module("dreamoving")), "controlnet": None})
    with pytest.raises(ConfigError, match="models.clip_vision: '/nowhere/clip.safetensors' does not exist"):
        _setup("content_guider", tmp_path, models={"clip_vision": "/nowhere/clip.safetensors"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="adam_8bit.*needs a CUDA device"):
            _setup("long_frame", tmp_path, optimizer={"adam_8bit": True})
        with pytest.raises(ConfigError, match="mixed_precision fp16 needs a CUDA device"):
            _setup("long_frame", tmp_path, mixed_precision="fp16")


def test_command_line_reports_a_bad_setting_and_exits_2():
    env = {**os.environ, "PYTHONPATH": str(PACK_DIR)}
    out = subprocess.run([sys.executable, "-m", "dreamoving_core.train", "long_frame", "data.resolution=100"],
                         cwd=PACK_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "error: data.resolution must be a positive multiple of 8" in out.stderr


def test_a_new_guider_starts_its_keys_and_values_from_the_unets_and_round_trips_through_our_format(tmp_path):
    from dreamoving_core.guider.clip_image import ClipImageEncoder
    from dreamoving_core.guider.model import load_content_guider
    from dreamoving_core.train.base import load_unet
    from dreamoving_core.train.stages import Parts, SPECS, build_guider, export
    from dreamoving_core.train.unet import DreaMovingUNet

    config = load_config("content_guider", None, [{"guider": {"perceiver_depth": 1, "perceiver_dim": 64}}])
    unet = DreaMovingUNet(load_unet(load_state_dict(training_checkpoint("kl", "small")), "small",
                                    components_dir("small")), guided=True)
    guider = build_guider(config, Parts(clip=ClipImageEncoder.from_file(tiny_guider.clip_vision_file(1))), unet)
    layers = unet.cross_attention_layers()
    assert set(guider.sources) == {"face", "cloth"} and len(layers) == 7
    for source in guider.sources.values():
        assert all(torch.equal(k.weight, a.to_k.weight) and torch.equal(v.weight, a.to_v.weight)
                   for k, v, a in zip(source.to_k, source.to_v, layers))
    assert guider.sources["face"].config.kind == "faceid" and guider.sources["cloth"].config.kind == "resampler"
    path = tmp_path / "guider.safetensors"
    export(SPECS["content_guider"], guider, path, {"stage": "content_guider"})
    loaded = load_content_guider(path)
    for slot, source in guider.sources.items():
        assert loaded.sources[slot].config == source.config
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.sources[slot].state_dict()[key], value), key
