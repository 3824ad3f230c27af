"""Evaluation: class scoring by log-likelihood (default) or generation + name matching; sklearn metrics."""

from collections.abc import Iterator
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
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

from trainer.data import ChatFormat, to_rgb

UNKNOWN = -1  # a generated answer that names no breed


def prompt_batches(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    chat: ChatFormat,
    split: datasets.Dataset,
    batch_size: int,
) -> Iterator[BatchFeature]:
    for start in range(0, len(split), batch_size):
        images = split[start : start + batch_size]["image"]
        inputs = processor(
            text=[chat.prompt] * len(images),
            images=[[to_rgb(image)] for image in images],
            add_special_tokens=False,  # the template already starts with <bos>
            return_tensors="pt",
        )
        yield inputs.to(model.device, dtype=model.dtype)


@torch.no_grad()
def answer_log_likelihoods(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    chat: ChatFormat,
    split: datasets.Dataset,
    batch_size: int,
) -> torch.Tensor:
    """(images, classes) log-likelihood of each breed's answer (name + end-of-turn) after the prompt.

    The prompt with its image runs once; its KV cache is repeated for the 37 answers, which run together
    as one batch of short right-padded sequences.
    """
    model.eval()
    num_classes = len(chat.answers)
    width = max(len(answer) for answer in chat.answers)
    answer_ids = torch.tensor([a + [0] * (width - len(a)) for a in chat.answers], device=model.device)
    answer_mask = torch.tensor(
        [[1] * len(a) + [0] * (width - len(a)) for a in chat.answers], device=model.device
    )
    scores = []
    for inputs in prompt_batches(model, processor, chat, split, batch_size):
        rows = len(inputs["input_ids"])
        prompt = model(**inputs, use_cache=True, logits_to_keep=1)
        cache = prompt.cache
        cache.batch_repeat_interleave(num_classes)
        answers = model(
            input_ids=answer_ids.repeat(rows, 1),
            attention_mask=torch.cat(
                [inputs["attention_mask"].repeat_interleave(num_classes, 0), answer_mask.repeat(rows, 1)],
                dim=1,
            ),
            cache=cache,
            use_cache=True,
        )
        # Token k of an answer is predicted by the position before it: the prompt's last for k = 0.
        logits = torch.cat([prompt.logits.repeat_interleave(num_classes, 0), answers.logits[:, :-1]], dim=1)
        token_logp = logits.float().log_softmax(-1).gather(-1, answer_ids.repeat(rows, 1)[..., None])[..., 0]
        scores.append((token_logp * answer_mask.repeat(rows, 1)).sum(-1).view(rows, num_classes).cpu())
    return torch.cat(scores)


def score_classes(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    chat: ChatFormat,
    split: datasets.Dataset,
    batch_size: int,
) -> list[int]:
    """The most likely breed: never UNKNOWN."""
    return answer_log_likelihoods(model, processor, chat, split, batch_size).argmax(-1).tolist()


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
) -> list[int]:
    """Greedy generation, stopped at the end of the turn, then name matching; UNKNOWN when none matches."""
    model.eval()
    stop = list(
        dict.fromkeys([*np.atleast_1d(model.generation_config.eos_token_id or []), *chat.end_of_turn])
    )
    predictions: list[int] = []
    for inputs in prompt_batches(model, processor, chat, split, batch_size):
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


def predict(
    method: str,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    chat: ChatFormat,
    split: datasets.Dataset,
    class_names: list[str],
    batch_size: int,
) -> list[int]:
    if method == "score":
        return score_classes(model, processor, chat, split, batch_size)
    return generate_classes(model, processor, chat, split, class_names, batch_size)


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
