"""Frozen patch encoders: RGB uint8 patches in, one feature vector per patch out.

* ``eva-vit-g``: BLIP-2's EVA ViT-g/14 (1408-d), from a local folder holding a BLIP-2 checkpoint
  (e.g. a download of Salesforce/blip2-flan-t5-xl; only ``vision_model.*`` is read) or the vision
  tower alone. The feature is the class token after the final layer norm: the same vector
  BLIP-2's ``pooler_output`` gives, and the first of the tokens its Q-Former reads.
* ``hf-vision``: any transformers vision backbone folder (ViT, DINOv2, ...): ``pooler_output``
  when the model has one, else the class token of ``last_hidden_state``.
* ``tiny-vit``: a small randomly initialised ViT (fixed seed) for tests and the demo only. Its
  feature is the mean of its patch tokens: a random class token has learned nothing to
  summarise, while the token mean keeps colour and texture statistics.
* ``vit-s-random``: a ViT-S/16-sized model (384-d, 12 layers, 6 heads) with random weights (fixed
  seed), for benchmarks only: it costs what a real ViT-S costs, and its features mean nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pathm3.errors import MissingWeightsError

ENCODERS = ("eva-vit-g", "hf-vision", "tiny-vit", "vit-s-random")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EVA_HINT = "a BLIP-2 checkpoint in Hugging Face format (e.g. Salesforce/blip2-flan-t5-xl)"
TINY_VIT_DIM = 64


@dataclass
class Encoder:
    """A frozen backbone with its preprocessing; call :meth:`encode` on uint8 patches."""

    name: str
    model: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str  # "cls", "pooler" or "mean"
    dim: int

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "Encoder":
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, dim) float32."""
        p = next(self.model.parameters())
        x = patches.to(p.device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        out = self.model(pixel_values=((x - mean) / std).to(p.dtype))
        if self.pooling == "pooler" and getattr(out, "pooler_output", None) is not None:
            feats = out.pooler_output
        elif self.pooling == "mean":
            feats = out.last_hidden_state[:, 1:].mean(1)
        else:
            feats = out.last_hidden_state[:, 0]
        return feats.float()


def load_encoder(name: str, weights: str | None = None) -> Encoder:
    """Build an encoder by name; pretrained ones load from the local folder ``weights``."""
    if name == "tiny-vit":
        return _tiny_vit()
    if name == "vit-s-random":
        return _vit_s_random()
    if name not in ENCODERS:
        raise MissingWeightsError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    hint = EVA_HINT if name == "eva-vit-g" else "a transformers vision model (e.g. facebook/dinov2-base)"
    if not weights:
        raise MissingWeightsError(f"--encoder {name} needs --weights FOLDER: download {hint} and pass its folder")
    folder = Path(weights)
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(f"{folder}: no config.json; download {hint} into this folder")
    return _eva_vit_g(folder) if name == "eva-vit-g" else _hf_vision(folder)


def _tiny_vit() -> Encoder:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=TINY_VIT_DIM, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=224, patch_size=16, initializer_range=0.1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ViTModel(cfg, add_pooling_layer=False)
    return Encoder("tiny-vit", model.eval(), 224, IMAGENET_MEAN, IMAGENET_STD, "mean", TINY_VIT_DIM)


def _vit_s_random() -> Encoder:
    """Benchmark-only: ViT-S/16's shape (22M parameters) with random weights; class token."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    image_size=224, patch_size=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ViTModel(cfg, add_pooling_layer=False)
    return Encoder("vit-s-random", model.eval(), 224, IMAGENET_MEAN, IMAGENET_STD, "cls", 384)


def _eva_vit_g(folder: Path) -> Encoder:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from pathm3.weights import read_tensors

    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") == "blip-2":
        cfg = Blip2VisionConfig(**raw["vision_config"])
        model = Blip2VisionModel(cfg)
        tensors = read_tensors(folder, "vision_model.", EVA_HINT, "--weights")
        result = model.load_state_dict(tensors, strict=False)
        if result.missing_keys:
            raise MissingWeightsError(f"{folder}: vision_model weights incomplete (missing {result.missing_keys[:3]}); "
                                      f"download {EVA_HINT} again")
    else:
        model = Blip2VisionModel.from_pretrained(str(folder), local_files_only=True)
        cfg = model.config
    return Encoder("eva-vit-g", model.eval(), cfg.image_size, CLIP_MEAN, CLIP_STD, "pooler", cfg.hidden_size)


def _hf_vision(folder: Path) -> Encoder:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    cfg = model.config
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, getattr(cfg, "image_size", 224)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        crop = p.get("crop_size") or p.get("size") or {}
        size = crop.get("height", crop.get("shortest_edge", size)) if isinstance(crop, dict) else crop
    dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "hidden_sizes", [None])[-1]
    return Encoder("hf-vision", model, int(size), mean, std, "pooler", int(dim))


def encoder_description() -> str:
    """The module docstring, for ``--help``."""
    return " ".join(line.strip() for line in (__doc__ or "").splitlines() if line.strip())


def random_patches(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, size, size, 3) uint8 noise: encoder-only benchmarks."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8))
