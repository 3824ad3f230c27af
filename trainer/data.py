"""Oxford-IIIT Pet from a Hub id, a saved datasets directory or a directory in the official layout."""

import io
import random
from collections import defaultdict
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from PIL import Image
from transformers import ProcessorMixin

from trainer import UserError

PROMPT = "What breed is the pet in this picture? Answer with the breed name only."


@dataclass
class PetData:
    train: datasets.Dataset  # columns: image (decoded lazily to PIL), label (int), image_key (int)
    test: datasets.Dataset  # image_key is unique across both splits
    class_names: list[str]  # readable, indexed by label


def readable_name(raw: str) -> str:
    """'american_pit_bull_terrier' -> 'American Pit Bull Terrier'."""
    return " ".join(word.capitalize() for word in raw.replace("-", "_").split("_"))


def prompt_messages(question: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@dataclass
class ChatFormat:
    """The conversation as the processor's chat template renders it, cut where the answer starts."""

    prompt: str  # user turn with the image placeholder, then the opening of the model turn
    answers: list[list[int]]  # per class: the breed name's tokens, then the end-of-turn tokens
    end_of_turn: list[int]


def chat_format(processor: ProcessorMixin, class_names: list[str], question: str = PROMPT) -> ChatFormat:
    """Render each answer through the template and keep the name and the turn's closing marker.

    Name and marker are tokenized on their own and appended to the prompt's tokens, so training, scoring
    and generation all see the same tokens for a breed, whatever the tokenizer would merge across them.
    `question`: the user's text; the trainer always asks PROMPT (bench/ pads it to the real prompt length).
    """
    messages = prompt_messages(question)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokenizer = processor.tokenizer
    answers, end_of_turn = [], []
    for name in class_names:
        answer = {"role": "assistant", "content": [{"type": "text", "text": name}]}
        full = processor.apply_chat_template([*messages, answer], tokenize=False)
        if not full.startswith(prompt + name):
            raise ValueError(f"the chat template does not render the answer {name!r} right after the prompt")
        # What follows the name is the end-of-turn marker and then whitespace that only separates turns.
        end_of_turn = tokenizer(full[len(prompt + name) :].strip(), add_special_tokens=False)["input_ids"]
        answers.append(tokenizer(name, add_special_tokens=False)["input_ids"] + end_of_turn)
    return ChatFormat(prompt, answers, end_of_turn)


def to_rgb(image: Image.Image) -> Image.Image:
    # The real set has grayscale, RGBA and palette files; the vision tower wants 3 channels.
    return image if image.mode == "RGB" else image.convert("RGB")


def single_thread(_: int) -> None:
    """Dataloader workers each resize one batch: PyTorch's threads per worker would only compete."""
    torch.set_num_threads(1)


class PromptEncoder:
    """The prompt with its image as model inputs, for a batch of examples.

    With `features` (the keys whose image features are stored, trainer.speed.features.ImageFeatures), a
    batch whose images are all stored carries image_keys instead of pixel values and skips image decoding
    and resizing: the prompt's tokens do not depend on the image, so they are rendered once.
    """

    def __init__(self, processor: ProcessorMixin, chat: ChatFormat, features: Container[int] | None = None):
        self.processor = processor
        self.chat = chat
        self.features = features
        self._prompt: dict[str, torch.Tensor] | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor | list[int]]:
        if self.features is not None and all(example["image_key"] in self.features for example in examples):
            if self._prompt is None:
                self._prompt = self._encode([Image.new("RGB", (32, 32))])
                del self._prompt["pixel_values"]
            batch = {name: tensor.repeat(len(examples), 1) for name, tensor in self._prompt.items()}
            # A list, not a tensor: the trainer moves tensors to the GPU, and reading keys back from there
            # would make each step wait for the previous one to finish.
            batch["image_keys"] = [example["image_key"] for example in examples]
            return batch
        return self._encode([to_rgb(example["image"]) for example in examples])

    def _encode(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        batch = self.processor(
            text=[self.chat.prompt] * len(images),
            images=[[image] for image in images],
            add_special_tokens=False,  # the template already starts with <bos>
            return_tensors="pt",
        )
        return dict(batch)


def load_pets(dataset: str, train_size: int, eval_size: int, seed: int, token: str | None = None) -> PetData:
    """Subsets of the official splits (train from trainval, eval from test), stratified per breed."""
    train, test, raw_names = _load_splits(dataset, token)
    for split, size, flag in ((train, train_size, "--train-size"), (test, eval_size, "--eval-size")):
        if size > len(split):
            raise UserError(
                f"{flag} {size} is larger than the split it is drawn from ({len(split)} images)",
                f"Use {flag} {len(split)} or less.",
            )
    train = train.select(stratified_indices(train["label"], train_size, seed))
    test = test.select(stratified_indices(test["label"], eval_size, seed))
    check_images(train)
    check_images(test)
    train = train.add_column("image_key", list(range(len(train))))
    test = test.add_column("image_key", list(range(len(train), len(train) + len(test))))
    return PetData(train, test, [readable_name(name) for name in raw_names])


def stratified_indices(labels: list[int], size: int, seed: int) -> list[int]:
    """Round-robin over the breeds, each shuffled with the seed, so every breed gets size/37 (+-1) images.

    Written out because sklearn's stratified split refuses sizes below the class count or equal to the
    whole split, both of which users ask for.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    classes = sorted(by_class)
    rng.shuffle(classes)  # which breeds get the extra image when size is not a multiple of 37
    for indices in by_class.values():
        rng.shuffle(indices)
    longest = max(len(indices) for indices in by_class.values())
    order = [by_class[c][k] for k in range(longest) for c in classes if k < len(by_class[c])]
    return sorted(order[:size])


def check_images(split: datasets.Dataset) -> None:
    """Decode every image once, so an unreadable file fails now with its name, not hours into training."""
    for item in split.cast_column("image", datasets.Image(decode=False))["image"]:
        source = item["path"] if item.get("bytes") is None else io.BytesIO(item["bytes"])
        try:
            with Image.open(source) as image:
                image.load()
        except (OSError, ValueError) as error:
            raise UserError(
                f"cannot read image {item.get('path') or '<in-memory>'}: {error}",
                "Replace or remove that image in the dataset (and stage the dataset again).",
            ) from None


def _load_splits(dataset: str, token: str | None) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    path = Path(dataset).expanduser()
    if path.is_dir():
        if (path / "annotations" / "list.txt").is_file():
            return _load_official_layout(path)
        if (path / "dataset_dict.json").is_file():
            return _from_dataset_dict(datasets.load_from_disk(str(path)), dataset)
        # A Hub dataset repository copied as is (gemma-launch stages timm/oxford-iiit-pet so): parquet shards.
        if any(path.glob("data/*.parquet")) or any(path.glob("*/*.parquet")):
            return _from_dataset_dict(datasets.load_dataset(str(path)), dataset)
        raise UserError(
            f"dataset directory {dataset} has neither annotations/list.txt (official Oxford-IIIT Pet "
            "layout), dataset_dict.json (datasets.save_to_disk) nor parquet shards (a Hub dataset "
            "repository)",
            "Pass a directory holding annotations/ and images/, a datasets.save_to_disk directory, or a Hub "
            "dataset id.",
        )
    if path.exists() or dataset.startswith(("/", ".", "~")):
        raise UserError(
            f"dataset directory {dataset} does not exist",
            "Check the path; a --dataset not starting with /, . or ~ is read as a Hub dataset id.",
        )
    try:
        return _from_dataset_dict(datasets.load_dataset(dataset, token=token), dataset)
    except datasets.exceptions.DatasetNotFoundError as error:
        raise UserError(
            f"dataset {dataset} not found on the Hugging Face Hub: {error}",
            "Check the id (owner/name); a private dataset needs HF_TOKEN of an account that can see it.",
        ) from None


def _from_dataset_dict(
    splits: datasets.DatasetDict, name: str
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """timm/oxford-iiit-pet's shape: splits train (= trainval) and test, columns image and label."""
    if not {"train", "test"} <= set(splits) or not {"image", "label"} <= set(splits["train"].column_names):
        raise UserError(
            f"dataset {name} needs train and test splits with image and label columns",
            "Use a dataset shaped like timm/oxford-iiit-pet, or a directory in the official layout.",
        )
    label = splits["train"].features["label"]
    if not isinstance(label, datasets.ClassLabel):
        raise UserError(
            f"dataset {name}: the label column must be a ClassLabel with the breed names",
            "Cast it to datasets.ClassLabel(names=[...]) before save_to_disk, as in timm/oxford-iiit-pet.",
        )
    columns = ["image", "label"]
    return splits["train"].select_columns(columns), splits["test"].select_columns(columns), label.names


def _load_official_layout(root: Path) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """images/<Breed>_<n>.jpg; annotations/{list,trainval,test}.txt rows: Image CLASS-ID SPECIES BREED-ID."""
    names: dict[int, str] = {}
    for image_name, class_id in _read_rows(root / "annotations" / "list.txt"):
        names[class_id] = image_name.rsplit("_", 1)[0]
    if sorted(names) != list(range(1, len(names) + 1)):
        raise UserError(
            f"{root}/annotations/list.txt: class ids are not 1..{len(names)}",
            "Number the breeds 1 to N without gaps, as the official list.txt does.",
        )
    splits = []
    for split_file in ("trainval.txt", "test.txt"):
        rows = _read_rows(root / "annotations" / split_file)
        split = datasets.Dataset.from_dict(
            {
                "image": [str(root / "images" / f"{image_name}.jpg") for image_name, _ in rows],
                "label": [class_id - 1 for _, class_id in rows],
            }
        )
        splits.append(split.cast_column("image", datasets.Image()))
    return splits[0], splits[1], [names[class_id] for class_id in sorted(names)]


def _read_rows(path: Path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise UserError(
            f"{path} is missing (expected the official Oxford-IIIT Pet layout)",
            "The official layout has annotations/list.txt, trainval.txt and test.txt next to images/.",
        )
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2 or not fields[1].isdigit():
            raise UserError(
                f"{path}:{number}: expected 'Image CLASS-ID SPECIES BREED-ID', got {line!r}",
                "Fix that line; lines starting with # are comments.",
            )
        rows.append((fields[0], int(fields[1])))
    return rows
