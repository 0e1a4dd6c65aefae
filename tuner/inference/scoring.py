"""CLIP-T, CLIP-I and DINO scores (as in the DreamBooth paper) from local weights.

- CLIP-T: cosine between a prompt's CLIP text embedding and its sample's image embedding.
- CLIP-I: cosine between CLIP image embeddings of samples and of the training images.
- DINO:   the same with DINO / DINOv2 ViT CLS features, which separate look-alikes better.
Each is the mean over all pairs, in [-1, 1]. Weights are read from local folders only (a
`save_pretrained` folder with its processor files); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from tuner.errors import TunerError

BATCH = 32


def _folder(path: str | Path, flag: str) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise TunerError(
            f"{flag} {path}: no config.json there; give a local folder saved with "
            "save_pretrained (model weights plus its processor files)"
        )
    return folder


def _load(loader, folder: Path, flag: str, what: str):
    try:
        return loader.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise TunerError(f"{flag} {folder}: cannot load the {what} ({first})") from exc


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding;
    # 4.x returns the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs of rows of a and b (unit vectors)."""
    return round(float((a @ b.T).mean()), 6)


class ClipScorer:
    def __init__(self, path: str | Path):
        from transformers import CLIPModel, CLIPProcessor

        folder = _folder(path, "--clip")
        self.model = _load(CLIPModel, folder, "--clip", "CLIP model").eval()
        self.processor = _load(CLIPProcessor, folder, "--clip", "CLIP processor")

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(images), BATCH):
            pixels = self.processor(images=images[i : i + BATCH], return_tensors="pt")
            chunks.append(_pooled(self.model.get_image_features(**pixels)))
        return _unit(torch.cat(chunks))

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(prompts), BATCH):
            tokens = self.processor(
                text=prompts[i : i + BATCH], return_tensors="pt", padding=True, truncation=True
            )
            chunks.append(_pooled(self.model.get_text_features(**tokens)))
        return _unit(torch.cat(chunks))

    def scores(self, images, prompts, references) -> dict[str, float]:
        """clip_t: each sample with its own prompt; clip_i: every sample with every reference."""
        image_embeds = self.images(images)
        text_embeds = self.texts(prompts)
        clip_t = round(float((image_embeds * text_embeds).sum(dim=-1).mean()), 6)
        return {"clip_t": clip_t, "clip_i": mean_cosine(image_embeds, self.images(references))}


class DinoScorer:
    def __init__(self, path: str | Path):
        from transformers import AutoImageProcessor, AutoModel

        folder = _folder(path, "--dino")
        self.model = _load(AutoModel, folder, "--dino", "DINO model").eval()
        self.processor = _load(AutoImageProcessor, folder, "--dino", "DINO image processor")

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(images), BATCH):
            pixels = self.processor(images=images[i : i + BATCH], return_tensors="pt")
            hidden = self.model(pixel_values=pixels["pixel_values"]).last_hidden_state
            chunks.append(hidden[:, 0])  # the CLS token, as the DreamBooth paper uses
        return _unit(torch.cat(chunks))

    def score(self, images, references) -> float:
        return mean_cosine(self.images(images), self.images(references))


def embed_scores(
    images: list[Image.Image],
    prompts: list[str],
    references: list[Image.Image],
    clip: str | Path | None = None,
    dino: str | Path | None = None,
) -> dict[str, float | None]:
    """{"clip_t", "clip_i", "dino"}: None for weights not given."""
    result: dict[str, float | None] = {"clip_t": None, "clip_i": None, "dino": None}
    if (clip or dino) and not references:
        raise TunerError("CLIP-I/DINO: no training images found to compare samples with")
    if clip:
        result.update(ClipScorer(clip).scores(images, prompts, references))
    if dino:
        result["dino"] = DinoScorer(dino).score(images, references)
    return result
