"""Zero-shot CLIP classification of generated images, for the Risk Difference (RD).

The paper classifies every image with CLIP ViT-L/14 ("openai/clip-vit-large-patch14") into
the axis's classes (gender: male, female; race: white, black, Hispanic, Asian); the class
prompts are configuration. This module uses transformers' `CLIPModel` and does the image
preprocessing itself with PIL and torch, since torchvision must stay out of the environment
(DESIGN.md section 3). The preprocessing is CLIP's: resize the shorter side to the vision
tower's input size with bicubic resampling, center-crop a square, scale to [0, 1], normalize
with CLIP's mean and standard deviation.

`ClipClassifier("tiny")` builds a small random-weight CLIP with the real CLIP tokenizer, for
tests and the offline demo; its probabilities say nothing about the images.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from biasmap.models import (
    PLANTED,
    ModelNotAvailableError,
    _resolve_dtype,
    clip_tokenizer,
    planted_folder,
    quiet_loading,
    resolve_source,
)

# The normalization of every OpenAI CLIP checkpoint (their preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAPER_MODEL = "openai/clip-vit-large-patch14"
TINY_MODELS = ("tiny",)


def clip_config(
    *,
    text_width: int,
    text_layers: int,
    text_mlp: int,
    vision_width: int,
    vision_layers: int,
    vision_mlp: int,
    image_size: int,
    patch_size: int,
    projection_dim: int,
):
    """A small transformers CLIPConfig with the real CLIP vocabulary and 4 heads per tower."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    from biasmap.models import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

    text = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=text_width,
        intermediate_size=text_mlp,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=vision_mlp,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim
    )


def tiny_clip(seed: int = 0):
    """A small random-weight transformers CLIPModel (32x32 images, patch 8, width 32), per seed."""
    from transformers import CLIPModel

    config = clip_config(
        text_width=32,
        text_layers=2,
        text_mlp=64,
        vision_width=32,
        vision_layers=2,
        vision_mlp=64,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIPModel(config)
    finally:
        torch.random.set_rng_state(state)
    return model.eval().requires_grad_(False)


def _normalization(folder: Path | None, image_size: int) -> tuple[tuple, tuple, int, int]:
    """(mean, std, resize side, crop side) from a model folder's preprocessor_config.json, or
    CLIP's defaults at the vision tower's input size."""
    mean, std, resize, crop = CLIP_MEAN, CLIP_STD, image_size, image_size
    config_file = folder / "preprocessor_config.json" if folder else None
    if config_file and config_file.is_file():
        config = json.loads(config_file.read_text())
        mean = tuple(config.get("image_mean", mean))
        std = tuple(config.get("image_std", std))
        size = config.get("size", resize)
        resize = size.get("shortest_edge", resize) if isinstance(size, dict) else int(size)
        crop_size = config.get("crop_size", crop)
        crop = crop_size.get("height", crop) if isinstance(crop_size, dict) else int(crop_size)
    return mean, std, int(resize), int(crop)


class ClipClassifier:
    """Zero-shot CLIP classifier: images -> softmax probabilities over class prompts.

    model: "tiny" (random weights, offline), "planted" (the planted world's trained CLIP,
    shipped with biasmap; see biasmap.world), a local folder holding a transformers CLIP
    checkpoint (`config.json` + weights, e.g. `huggingface-cli download
    openai/clip-vit-large-patch14 --local-dir FOLDER`), or a hub id such as
    "openai/clip-vit-large-patch14" (the paper's ViT-L/14).
    device: torch device; dtype: "fp32", "fp16" or "bf16" (or a torch.dtype).
    batch_size: images per forward pass in `classify`.
    local_files_only: None follows HF_HUB_OFFLINE; True never touches the network.
    Raises ModelNotAvailableError, saying how to supply the weights, when they cannot be found.
    """

    def __init__(
        self,
        model: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        *,
        batch_size: int = 32,
        seed: int = 0,
        local_files_only: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.name = model
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype)
        self.batch_size = batch_size
        folder = None
        if model in TINY_MODELS:
            clip, tokenizer = tiny_clip(seed), clip_tokenizer()
        elif model == PLANTED:
            from transformers import CLIPModel

            folder = planted_folder("clip")
            with quiet_loading():
                clip = CLIPModel.from_pretrained(folder, local_files_only=True)
            tokenizer = clip_tokenizer()
        else:
            clip, tokenizer, folder = self._load(model, local_files_only)
        self.model = clip.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        image_size = int(clip.config.vision_config.image_size)
        mean, std, self.resize_size, self.crop_size = _normalization(folder, image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @staticmethod
    def _load(name_or_path: str, local_files_only: bool | None):
        from transformers import AutoTokenizer, CLIPModel

        local_files_only, is_folder = resolve_source(
            name_or_path,
            local_files_only,
            "Pass a folder holding a transformers CLIP checkpoint (e.g. `huggingface-cli "
            f"download {PAPER_MODEL} --local-dir <folder>`), a hub id such as {PAPER_MODEL!r}, "
            f"or one of the offline random-weight models {TINY_MODELS}.",
            what="CLIP model",
        )
        try:
            clip = CLIPModel.from_pretrained(
                name_or_path, local_files_only=local_files_only or is_folder
            )
        except (OSError, ValueError) as error:
            where = (
                "in that folder" if is_folder else "in the local cache, and the hub is unreachable"
            )
            raise ModelNotAvailableError(
                f"Could not load the CLIP weights of {name_or_path!r} ({where}): {error}\n"
                f"On a machine with internet run `huggingface-cli download {name_or_path} "
                "--local-dir <folder>`, copy the folder here and pass its path. Without "
                f"weights, use the random-weight model {TINY_MODELS[0]!r} (its labels are "
                "meaningless)."
            ) from error
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name_or_path, local_files_only=local_files_only or is_folder
            )
        except (OSError, ValueError):
            # Every OpenAI CLIP shares one BPE vocabulary, which ships offline (models.py).
            warnings.warn(
                f"no tokenizer files with {name_or_path!r}; using the CLIP BPE tokenizer "
                "from open_clip_torch's vocabulary (the same for all OpenAI CLIP models)",
                stacklevel=3,
            )
            tokenizer = clip_tokenizer()
        return clip, tokenizer, Path(name_or_path) if is_folder else None

    # ----------------------------------------------------------------- preprocessing

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images (any size and mode) -> float32 pixel values [B, 3, crop, crop], normalized.

        Shorter side resized to `resize_size` (bicubic), then a centered `crop_size` square.
        """
        from PIL import Image

        pixels = []
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"images must be PIL images, got {type(image).__name__}")
            image = image.convert("RGB")
            width, height = image.size
            # The longer side is truncated, as CLIP's own image processor does.
            short = min(width, height)
            size = (
                self.resize_size if width == short else int(self.resize_size * width / short),
                self.resize_size if height == short else int(self.resize_size * height / short),
            )
            image = image.resize(size, Image.Resampling.BICUBIC)
            left = (size[0] - self.crop_size) // 2
            top = (size[1] - self.crop_size) // 2
            image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
            array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            pixels.append((array.permute(2, 0, 1) - self.mean) / self.std)
        return torch.stack(pixels)

    # ----------------------------------------------------------------- embeddings

    @staticmethod
    def _pooled(output) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projection;
        # earlier versions return the projected tensor itself.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def text_embeddings(self, class_prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings [C, D] of the class prompts, computed once per prompt list."""
        key = tuple(class_prompts)
        if not key:
            raise ValueError("class_prompts must hold at least one prompt")
        if key not in self._text_cache:
            tokens = self.tokenizer(
                list(key),
                padding="max_length",
                truncation=True,
                max_length=77,
                return_tensors="pt",
            )
            output = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            embeddings = self._pooled(output).float()
            self._text_cache[key] = embeddings / embeddings.norm(dim=-1, keepdim=True)
        return self._text_cache[key]

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        """Unit-norm image embeddings [B, D] of PIL images (one forward pass)."""
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        embeddings = self._pooled(self.model.get_image_features(pixel_values=pixels)).float()
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def classify(self, images: Sequence, class_prompts: Sequence[str]) -> torch.Tensor:
        """Zero-shot probabilities: float32 [B, C] on the CPU, each row a softmax over the C
        class prompts of CLIP's scaled cosine similarities (logit_scale.exp() * cos).

        images: B PIL images, classified `batch_size` at a time; class_prompts: C strings,
        e.g. ["a photo of a male", "a photo of a female"] (their embeddings are cached).
        """
        text = self.text_embeddings(class_prompts)
        if len(images) == 0:
            return torch.zeros(0, len(text))
        scale = self.model.logit_scale.float().exp()
        probabilities = []
        for start in range(0, len(images), self.batch_size):
            embeddings = self.image_embeddings(images[start : start + self.batch_size])
            probabilities.append((scale * embeddings @ text.T).softmax(dim=-1).cpu())
        return torch.cat(probabilities)
