"""Test material for data preparation: a synthetic dance film with known cuts, a corrupt video, face images and a
tiny random captioner in a real transformers model folder.

- ``synthetic_dance_film(path)``: the stick-figure dancer of :mod:`devtools.tiny.preprocess` in four shots of
  different colours (``SHOTS``) joined by two hard cuts and one fade through black (``TRANSITIONS``);
  ``FILM_CLIPS`` are the clips preparation must cut from it with ``FILM_BOUNDS``. In two shots the dancer has a red
  head, which the tiny InsightFace detector of :mod:`devtools.tiny.content_guider` sees as a face
  (``FILM_FACE_CLIPS``).
- ``captioner_dir()``: ``LlavaForConditionalGeneration`` (2-layer CLIP vision tower, 2-layer Llama) with random
  weights, a word-level tokenizer over a small English vocabulary, and a chat template, saved with
  ``save_pretrained``: the layout of any local image-text-to-text model folder.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from devtools.tiny import cached
from devtools.tiny.preprocess import synthetic_dance_frames

FILM_RATE = Fraction(10)
FILM_SIZE = 64

# (frames, colour multiplier, red head?) per shot; between consecutive shots a hard cut or a fade through black
SHOTS = (
    (25, (0.6, 0.7, 1.0), True),  # A: 2.5 s -> one clip
    (8, (1.0, 0.8, 0.3), False),  # B: 0.8 s -> too short, dropped
    (50, (0.4, 1.0, 0.5), False),  # C: 5 s -> two clips of 2.5 s
    (24, (1.0, 0.5, 0.9), True),  # D: 2.4 s -> one clip
)
TRANSITIONS = ("cut", "cut", "fade")
FADE = (8, 4, 8)  # frames fading out, black, fading in
FILM_BOUNDS = (2.0, 3.0)  # clip length bounds (seconds) the expected clips are cut with
FILM_CLIPS = ((0, 25), (33, 58), (58, 83), (103, 127))
FILM_FACE_CLIPS = ((0, 25), (103, 127))


def _shot(frames: int, colour, red_head: bool) -> np.ndarray:
    shot = (synthetic_dance_frames(frames, FILM_SIZE) * np.array(colour)).clip(0, 255).astype(np.uint8)
    if red_head:
        import cv2

        for image in shot:  # the dancer's head (devtools.tiny.preprocess.dance_skeleton), enlarged and red
            cv2.circle(image, (32, 13), 7, (255, 0, 0), -1)
    return shot


def synthetic_dance_film_frames() -> np.ndarray:
    """``(127, 64, 64, 3)`` uint8 RGB frames: ``SHOTS`` joined by ``TRANSITIONS``."""
    out_n, black_n, in_n = FADE
    parts = []
    for i, shot in enumerate(SHOTS):
        if i and TRANSITIONS[i - 1] == "fade":
            parts.append(_dim(_shot(out_n, *SHOTS[i - 1][1:]), _ramp(out_n)[::-1]))
            parts.append(np.zeros((black_n, FILM_SIZE, FILM_SIZE, 3), np.uint8))
            parts.append(_dim(_shot(in_n, *shot[1:]), _ramp(in_n)))
        parts.append(_shot(*shot))
    return np.concatenate(parts)


def _ramp(frames: int) -> np.ndarray:
    """Brightness levels of a fade-in: 1/(n+1) .. n/(n+1)."""
    return np.arange(1, frames + 1) / (frames + 1)


def _dim(frames: np.ndarray, level: np.ndarray) -> np.ndarray:
    return (frames * level[:, None, None, None]).round().astype(np.uint8)


def synthetic_dance_film(path: str | Path) -> Path:
    """Write the film as an H.264 MP4 at 10 fps (our own writer, high quality so the red heads stay red)."""
    from dreamoving_core.data.video import write_video

    write_video(path, synthetic_dance_film_frames(), FILM_RATE, crf=4)
    return Path(path)


def corrupt_video(path: str | Path) -> Path:
    """An ``.mp4`` that is not a video: an MP4 box header followed by garbage."""
    path = Path(path)
    rng = np.random.default_rng(0)
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


CAPTION_WORDS = tuple(
    "a the dancer dances spins jumps waves turns steps moves arms legs hands head hair red blue green pink orange "
    "white black yellow stage floor studio street room light dark woman man girl boy in on with wearing shirt dress "
    "jacket skirt smiling slowly quickly left right camera".split())
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def _tokenizer(words):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + list(words)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def _save_captioner(path: Path) -> None:
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from dreamoving_core.data.captions import DEFAULT_PROMPT

    tokenizer = _tokenizer(CAPTION_WORDS + tuple(DEFAULT_PROMPT.split()) + ("USER:", "ASSISTANT:"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    vocab = len(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16, vision_feature_layer=-1)
    config.text_config.initializer_range = 0.2  # at 0.02 images hardly change the words
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    # at least six caption words, none twice, no special or prompt token: a caption a person can read
    words = set(tokenizer.convert_tokens_to_ids(list(CAPTION_WORDS))) | {tokenizer.eos_token_id}
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, min_new_tokens=6,
                                               no_repeat_ngram_size=1,
                                               bad_words_ids=[[i] for i in range(vocab) if i not in words])
    model.save_pretrained(path)
    processor.save_pretrained(path)


def captioner_dir() -> Path:
    """A tiny random LLaVA captioner folder (``save_pretrained`` layout: config, safetensors, processor,
    tokenizer, chat template)."""
    return cached("captioner/v1/tiny-llava", _save_captioner)


def _save_blip(path: Path) -> None:
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, GenerationConfig)

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(specials + list(CAPTION_WORDS))},
                                  bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = BlipConfig(vision_config={**layers, "image_size": 32, "patch_size": 8},
                        text_config={**layers, "vocab_size": len(tokenizer), "encoder_hidden_size": 32,
                                     "bos_token_id": 5, "pad_token_id": 0, "sep_token_id": 3})
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=5, eos_token_id=3, pad_token_id=0, min_new_tokens=4)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def blip_captioner_dir() -> Path:
    """A tiny random BLIP captioner folder: a captioning model without chat template, which continues a plain text
    prompt."""
    return cached("captioner/v1/tiny-blip", _save_blip)


def data_sources(folder: Path) -> Path:
    """A source folder: ``videos/film.mp4`` (``FILM``), ``videos/broken.mp4`` (corrupt), ``photos/face.png`` (a
    face for the tiny InsightFace pack) and ``photos/noface.png`` (none)."""
    from devtools.tiny.content_guider import face_image
    from dreamoving_core.data.video import write_image

    synthetic_dance_film(folder / "videos" / "film.mp4")
    corrupt_video(folder / "videos" / "broken.mp4")
    write_image(folder / "photos" / "face.png", face_image(64)[0].numpy())
    write_image(folder / "photos" / "noface.png", face_image(64, face=False)[0].numpy())
    return folder


MODEL_NAMES = {"dwpose_detector": "dreamoving/preprocess/yolox_l.onnx",
               "dwpose_estimator": "dreamoving/preprocess/dw-ll_ucoco_384.onnx",
               "zoedepth": "dreamoving/preprocess/zoedepth-nyu-kitti", "insightface": "insightface/models/buffalo_l",
               "captioner": "LLM/tiny-llava"}


def models_folder(folder: Path, garbage: bool = False) -> Path:
    """A ``--models`` folder in ComfyUI's layout holding the tiny DWPose pair, ZoeDepth, InsightFace pack
    (``buffalo_l``) and captioner (``tiny-llava``), linked. ``garbage``: every file except the captioner's is
    replaced by bytes no loader accepts, under the same names (a run that loads one of them fails)."""
    import shutil

    from devtools.tiny import content_guider, preprocess

    targets = {"dwpose_detector": preprocess.yolox_onnx(), "dwpose_estimator": preprocess.dwpose_onnx(),
               "zoedepth": preprocess.zoedepth_dir(),
               "insightface": content_guider.insightface_root() / "models" / "buffalo_l",
               "captioner": captioner_dir()}
    for kind, name in MODEL_NAMES.items():
        link, target = folder / name, targets[kind]
        link.parent.mkdir(parents=True, exist_ok=True)
        if not garbage or kind == "captioner":
            link.symlink_to(target)
        elif target.is_dir():
            shutil.copytree(target, link)
            for file in link.rglob("*"):
                if file.is_file():
                    file.write_bytes(b"not a model")
        else:
            link.write_bytes(b"not a model")
    return folder
