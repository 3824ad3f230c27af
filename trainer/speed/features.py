"""The frozen image features (vision tower and projector), computed once per image and reused by training
and scoring."""

import time

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, ProcessorMixin

from trainer.data import single_thread, to_rgb
from trainer.speed.layers import gemma_backbone
from trainer.speed.memory import PassMemory, measure_pass, pass_batch


class ImageFeatures:
    """The frozen vision tower's and projector's output for each image, computed once and reused.

    Keys are the data's image_key column. Installed on the model, it lets batches carry `image_keys` instead
    of pixel values: a forward pre-hook on the Gemma 3 backbone turns them into input embeddings with the
    stored features in the image tokens' places, exactly what the backbone would compute from the pixels.
    Only valid while the vision tower and projector are frozen.
    """

    def __init__(self) -> None:
        self.features: dict[int, torch.Tensor] = {}
        self.filled = 0  # images computed, and the seconds it took
        self.fill_seconds = 0.0

    def __contains__(self, key: int) -> bool:
        return key in self.features

    def has_all(self, keys: list[int]) -> bool:
        return all(key in self.features for key in keys)

    @torch.no_grad()
    def measure(
        self, model: PreTrainedModel, processor: ProcessorMixin, split: datasets.Dataset, budget: int
    ) -> PassMemory:
        """The feature pass's memory on this GPU, from batches of the split's first one and two images."""
        backbone = gemma_backbone(model)
        collate = PixelCollator(processor)

        def run(count: int) -> None:
            _, pixels = collate([split[index] for index in range(min(count, len(split)))])
            image_features(backbone, pixels)

        return measure_pass(run, budget)

    @torch.no_grad()
    def fill(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        split: datasets.Dataset,
        batch_size: int,
        num_workers: int = 0,
        memory: PassMemory | None = None,
    ) -> int:
        """Compute the features of the split's images not stored yet; returns how many were computed.

        With the pass's measured `memory`, batches are the largest up to `batch_size` that fit it: SigLIP
        runs 4,096 patches per image at once, so a batch of --eval-batch-size images may not fit beside
        large weights in a small budget (docs/benchmarks.md, "No-grad passes planned too").
        """
        backbone = gemma_backbone(model)
        frozen = all(
            not p.requires_grad
            for module in (backbone.vision_tower, backbone.multi_modal_projector)
            for p in module.parameters()
        )
        if not frozen:
            raise ValueError(
                "image features are reusable only while the vision tower and projector are frozen"
            )
        todo = [index for index, key in enumerate(split["image_key"]) if key not in self.features]
        if not todo:
            return 0
        start = time.perf_counter()
        if memory is not None:
            batch_size = pass_batch(f"image features of {len(todo)} images", batch_size, memory)
        loader = DataLoader(
            split.select(todo),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=PixelCollator(processor),
            worker_init_fn=single_thread,
        )
        for keys, pixels in loader:
            features = image_features(backbone, pixels)
            for key, feature in zip(keys, features.to("cpu"), strict=True):
                self.features[key] = feature.clone()
        self.filled += len(todo)
        self.fill_seconds += time.perf_counter() - start
        return len(todo)

    def install(self, model: PreTrainedModel) -> None:
        gemma_backbone(model).register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def _pre_forward(self, backbone: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        keys = kwargs.pop("image_keys", None)
        if keys is None:
            return args, kwargs
        input_ids = kwargs["input_ids"]
        embeddings = backbone.get_input_embeddings()
        image_token = backbone.config.image_token_id
        is_image = input_ids == image_token
        # The backbone maps an out-of-vocabulary image token id to 0 before the lookup; so do we.
        lookup = input_ids.masked_fill(is_image, 0) if image_token >= embeddings.num_embeddings else input_ids
        inputs_embeds = embeddings(lookup)
        features = torch.stack([self.features[key] for key in keys])
        if inputs_embeds.is_cuda:
            # From pageable memory the copy waits for the GPU's queue to drain; from pinned memory (torch's
            # caching host allocator, which keeps the buffer until the copy is done) it does not.
            features = features.pin_memory()
        features = features.to(inputs_embeds.device, inputs_embeds.dtype, non_blocking=True)
        kwargs["inputs_embeds"] = inputs_embeds.masked_scatter(is_image[..., None], features)
        kwargs["input_ids"] = None
        return args, kwargs


def image_features(backbone: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower's and projector's output for a batch of pixel values, on the model's device."""
    parameter = next(backbone.vision_tower.parameters())
    return backbone.get_image_features(
        pixels.to(parameter.device, parameter.dtype), return_dict=True
    ).pooler_output


class PixelCollator:
    """(image keys, pixel values) of a batch, as the processor prepares images for the vision tower."""

    def __init__(self, processor: ProcessorMixin) -> None:
        self.image_processor = processor.image_processor

    def __call__(self, examples: list[dict]) -> tuple[list[int], torch.Tensor]:
        images = [to_rgb(example["image"]) for example in examples]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return [example["image_key"] for example in examples], pixels
