"""Evaluation: class scoring by log-likelihood (default) or generation + name matching; sklearn metrics."""

import contextlib
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    f1_score,
    precision_recall_fscore_support,
)
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, ProcessorMixin

from trainer.data import ChatFormat, PromptEncoder, single_thread

UNKNOWN = -1  # a generated answer that names no breed
TOP_K = 5  # breeds recorded per image in predictions.json


def prompt_batches(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    chat: ChatFormat,
    split: datasets.Dataset,
    batch_size: int,
    features: Container[int] | None = None,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Prompt inputs on the model's device; image decoding and resizing in `num_workers` processes."""
    if features is not None and all(key in features for key in split["image_key"]):
        split = split.remove_columns("image")  # batches carry image keys: decoding would be wasted
    on_gpu = model.device.type == "cuda"
    loader = DataLoader(
        split,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=PromptEncoder(processor, chat, features),
        worker_init_fn=single_thread,
        # Pinned batches copy without making the host wait for the GPU's queue to drain first.
        pin_memory=on_gpu,
    )
    for inputs in loader:
        yield {
            name: tensor.to(
                model.device, dtype=model.dtype if tensor.is_floating_point() else None, non_blocking=on_gpu
            )
            if isinstance(tensor, torch.Tensor)
            else tensor
            for name, tensor in inputs.items()
        }


def half_precision(model: PreTrainedModel) -> contextlib.AbstractContextManager:
    """Autocast to the model's 16-bit dtype, as training runs under: PEFT keeps the adapters in float32
    and casts their input up to it, so without it every adapter runs a float32 matmul on a float32 copy of
    its input (8 % of 27B's evaluation kernel time on the H200, docs/benchmarks.md). A float32 model runs
    as it is."""
    if model.dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=model.dtype)


@dataclass
class AnswerPack:
    """All answers laid one after another behind the prompt, in one sequence per image.

    Each answer token sees the whole prompt and the earlier tokens of its own answer only, at the positions
    it would have right after the prompt: one forward pass scores every answer, with no copy of the prompt's
    KV cache per answer (37 copies of a large model's cache outgrow the GPU: docs/benchmarks.md, "Scoring
    without copying the KV cache").
    """

    ids: torch.Tensor  # (answer tokens,) all answers concatenated
    positions: torch.Tensor  # (prompt + answer tokens,)
    segments: torch.Tensor  # 0 for the prompt, i + 1 for answer i
    keep: torch.Tensor  # sequence indices whose logits predict an answer token
    targets: torch.Tensor  # the answer token each kept position predicts
    owner: torch.Tensor  # the answer each target belongs to

    @classmethod
    def build(cls, answers: list[list[int]], prompt_length: int) -> "AnswerPack":
        ids, positions, segments = [], list(range(prompt_length)), [0] * prompt_length
        keep, targets, owner = [], [], []
        for index, answer in enumerate(answers):
            start = prompt_length + len(ids)
            for k, token in enumerate(answer):
                # Token k is predicted by the token before it: the prompt's last one for k = 0.
                keep.append(prompt_length - 1 if k == 0 else start + k - 1)
                targets.append(token)
                owner.append(index)
            ids += answer
            positions += range(prompt_length, prompt_length + len(answer))
            segments += [index + 1] * len(answer)
        return cls(*(torch.tensor(values) for values in (ids, positions, segments, keep, targets, owner)))

    def masks(self, token_type_ids: torch.Tensor, config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Gemma 3's full and sliding attention masks for the packed sequence, (1, 1, length, length).

        The model's own rules for each prompt + answer sequence: causal, bidirectional inside
        the image, sliding layers limited to the window, all measured in positions.
        """
        pos, seg = self.positions, self.segments
        image = torch.cat([token_type_ids.cpu() == 1, torch.zeros(len(self.ids), dtype=torch.bool)])
        same_branch = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])
        allowed = (pos[None, :] <= pos[:, None]) & same_branch
        # One image per prompt here, so "the same image block" is "both are image tokens".
        allowed |= image[:, None] & image[None, :]
        sliding = allowed & (pos[None, :] > pos[:, None] - config.sliding_window)
        implementation = config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"class scoring supports sdpa and eager attention, not {implementation}")
        masks = {"full_attention": allowed, "sliding_attention": sliding}
        for name, mask in masks.items():
            if implementation == "eager":  # additive masks
                mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
            masks[name] = mask[None, None]
        return masks


@torch.no_grad()
def answer_log_likelihoods(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    chat: ChatFormat,
    split: datasets.Dataset,
    batch_size: int,
    features: Container[int] | None = None,
    num_workers: int = 0,
) -> torch.Tensor:
    """(images, classes) log-likelihood of each breed's answer (name + end-of-turn) after the prompt."""
    model.eval()
    text_config = model.config.get_text_config()
    pack: AnswerPack | None = None
    scores = []
    for inputs in prompt_batches(model, processor, chat, split, batch_size, features, num_workers):
        rows, prompt_length = inputs["input_ids"].shape
        if not bool(inputs.pop("attention_mask").all()):
            raise ValueError("class scoring expects unpadded prompts (the same text for every image)")
        if pack is None:
            pack = AnswerPack.build(chat.answers, prompt_length)
            masks = {
                name: mask.to(model.device)
                for name, mask in pack.masks(inputs["token_type_ids"][0], text_config, model.dtype).items()
            }
            device_pack = {
                name: getattr(pack, name).to(model.device)
                for name in ("ids", "positions", "keep", "targets", "owner")
            }
        del inputs["token_type_ids"]  # only used for the masks, which are given
        prompt_ids = inputs.pop("input_ids")
        with half_precision(model):
            outputs = model(
                **inputs,
                input_ids=torch.cat([prompt_ids, device_pack["ids"].expand(rows, -1)], dim=1),
                position_ids=device_pack["positions"].expand(rows, -1),
                attention_mask=masks,
                logits_to_keep=device_pack["keep"],
                use_cache=False,
            )
        token_logp = torch.stack(
            [
                row.float().log_softmax(-1).gather(-1, device_pack["targets"][:, None])[:, 0]
                for row in outputs.logits
            ]
        )
        # Summed on the device and read back once at the end: a read per batch would make the host wait
        # for each batch before it can queue the next one's copies and kernels.
        per_answer = token_logp.new_zeros(rows, len(chat.answers)).index_add_(
            1, device_pack["owner"], token_logp
        )
        scores.append(per_answer)
    return torch.cat(scores).cpu()


def match_name(text: str, class_names: list[str]) -> int:
    """The longest breed name in the text, case-insensitively (as the reference script matches)."""
    text = text.lower().replace("_", " ")
    found = [index for index, name in enumerate(class_names) if name.lower() in text]
    return max(found, key=lambda index: len(class_names[index]), default=UNKNOWN)


@torch.no_grad()
def generate_classes(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    chat: ChatFormat,
    split: datasets.Dataset,
    class_names: list[str],
    batch_size: int,
    num_workers: int = 0,
) -> list[int]:
    """Greedy generation, stopped at the end of the turn, then name matching; UNKNOWN when none matches.

    Always from the pixels: stored image features would be looked up again at every generated token.
    """
    model.eval()
    stop = list(
        dict.fromkeys([*np.atleast_1d(model.generation_config.eos_token_id or []), *chat.end_of_turn])
    )
    predictions: list[int] = []
    for inputs in prompt_batches(model, processor, chat, split, batch_size, num_workers=num_workers):
        with half_precision(model):
            output = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max(len(answer) for answer in chat.answers) + 8,
                eos_token_id=[int(token) for token in stop],
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        predictions += [match_name(text, class_names) for text in texts]
    return predictions


def predict_ranked(
    method: str,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    chat: ChatFormat,
    split: datasets.Dataset,
    class_names: list[str],
    batch_size: int,
    features: Container[int] | None = None,
    num_workers: int = 0,
) -> tuple[list[int], list[list[list[float]]] | None]:
    """Predictions, and per image the TOP_K most likely breeds as [class index, probability] (class
    scoring only: generation yields one answer, no score per breed)."""
    if method != "score":
        return generate_classes(model, processor, chat, split, class_names, batch_size, num_workers), None
    scores = answer_log_likelihoods(model, processor, chat, split, batch_size, features, num_workers)
    # The answers' likelihoods renormalised over the breeds: how the model splits its belief among them.
    top = scores.softmax(-1).topk(min(TOP_K, scores.shape[-1]), dim=-1)
    ranked = [
        [[int(index), round(float(value), 4)] for index, value in zip(indices, values, strict=True)]
        for indices, values in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]
    return scores.argmax(-1).tolist(), ranked


def summary_metrics(labels: list[int], predictions: list[int]) -> dict[str, float]:
    """Accuracy, macro-F1 over the breeds present in the eval subset, and the share of unmatched answers."""
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(
            f1_score(labels, predictions, labels=np.unique(labels), average="macro", zero_division=0)
        ),
        "unknown_rate": float(np.mean(np.asarray(predictions) == UNKNOWN)),
    }


def per_class_metrics(labels: list[int], predictions: list[int], class_names: list[str]) -> list[dict]:
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=range(len(class_names)), zero_division=0
    )
    return [
        {"name": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
    ]


def save_confusion_matrix(
    labels: list[int], predictions: list[int], class_names: list[str], path: Path
) -> None:
    # A bare Figure draws with Agg: no pyplot state and no display needed in the container.
    figure = Figure(figsize=(14, 14))
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(
        labels,
        predictions,
        labels=range(len(class_names)),
        display_labels=class_names,
        include_values=False,
        xticks_rotation="vertical",
        colorbar=False,
        ax=axes,
    )
    axes.set_title("Oxford-IIIT Pet: true vs predicted breed (fine-tuned)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
