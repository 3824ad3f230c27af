"""Data loading, answer masking, class scoring, name matching and checkpoint choice, without training."""

from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from trainer import UserError
from trainer.data import chat_format, load_pets, readable_name, stratified_indices, to_rgb
from trainer.evaluate import UNKNOWN, answer_log_likelihoods, match_name, summary_metrics
from trainer.modeling import load_processor
from trainer.offline.synthetic import BREEDS
from trainer.speed import choose_precision, load_model
from trainer.train import AnswerOnlyCollator, last_complete_checkpoint


def test_synthetic_set_has_the_official_layout(pets: Path) -> None:
    header = [
        line for line in (pets / "annotations" / "list.txt").read_text().splitlines() if line.startswith("#")
    ]
    assert header[0] == "#Image CLASS-ID SPECIES BREED ID" and len(header) == 6
    rows = [line.split() for line in (pets / "annotations" / "list.txt").read_text().splitlines()[6:]]
    assert len(rows) == 37 * 26 and {len(row) for row in rows} == {4}
    for name, class_id, species, _breed_id in rows:
        assert (pets / "images" / f"{name}.jpg").is_file()
        assert name[0].isupper() == (species == "1")  # cats capitalised, dogs lower case
        assert BREEDS[int(class_id) - 1] == name.rsplit("_", 1)[0]
    assert (
        max(int(r[3]) for r in rows if r[2] == "1") == 12
        and max(int(r[3]) for r in rows if r[2] == "2") == 25
    )
    trainval = {line.split()[0] for line in (pets / "annotations" / "trainval.txt").read_text().splitlines()}
    test = {line.split()[0] for line in (pets / "annotations" / "test.txt").read_text().splitlines()}
    assert (len(trainval), len(test), trainval & test) == (740, 222, set())
    modes = Counter(Image.open(path).mode for path in (pets / "images").glob("*.jpg"))
    assert {"RGB", "L", "RGBA", "P"} <= set(modes)


def test_load_pets_uses_the_official_splits_and_readable_names(pets: Path) -> None:
    data = load_pets(str(pets), 74, 37, seed=0)
    assert data.class_names[:3] == ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]
    assert readable_name("Egyptian_Mau") == "Egyptian Mau"
    assert Counter(data.train["label"]) == dict.fromkeys(range(37), 2)
    assert Counter(data.test["label"]) == dict.fromkeys(range(37), 1)
    test_files = {
        Path(item["path"]).stem
        for item in data.test.cast_column("image", datasets.Image(decode=False))["image"]
    }
    assert all(int(name.rsplit("_", 1)[1]) > 20 for name in test_files)  # numbers 21-26 are the test split
    assert {to_rgb(image).mode for image in data.train["image"]} == {"RGB"}


def test_stratified_subsets_are_balanced_and_seeded() -> None:
    labels = [label for label in range(37) for _ in range(20)]
    subset = stratified_indices(labels, 100, seed=1)
    counts = Counter(labels[i] for i in subset)
    assert len(subset) == 100 and len(counts) == 37 and max(counts.values()) - min(counts.values()) <= 1
    assert subset == stratified_indices(labels, 100, seed=1)
    assert subset != stratified_indices(labels, 100, seed=2)
    assert len(set(stratified_indices(labels, 10, seed=1))) == 10
    assert stratified_indices(labels, 740, seed=1) == list(range(740))


def test_collator_labels_only_the_answer_and_end_of_turn(tiny_model: Path, pets: Path) -> None:
    processor = load_processor(str(tiny_model), None)
    data = load_pets(str(pets), 74, 37, seed=0)
    chat = chat_format(processor, data.class_names)
    examples = [{"image": data.train[0]["image"], "label": 2}, {"image": data.train[1]["image"], "label": 25}]
    batch = AnswerOnlyCollator(processor, chat)(examples)
    decode = processor.tokenizer.decode
    labelled = [
        decode(ids[labels != -100]) for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)
    ]
    assert labelled == ["American Pit Bull Terrier<end_of_turn>", "Pug<end_of_turn>"]
    assert decode(batch["input_ids"][0][batch["attention_mask"][0] == 1]).endswith(
        "<start_of_turn>model\nAmerican Pit Bull Terrier<end_of_turn>"
    )
    assert batch["input_ids"][0].tolist().count(processor.tokenizer.bos_token_id) == 1
    assert batch["token_type_ids"].sum(1).tolist() == [4, 4]  # the image's soft tokens
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_scoring_with_a_shared_prompt_matches_full_sequence_scoring(tiny_model: Path, pets: Path) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    processor = load_processor(str(tiny_model), None)
    data = load_pets(str(pets), 37, 5, seed=0)
    chat = chat_format(processor, data.class_names)
    scores = answer_log_likelihoods(model, processor, chat, data.test, batch_size=2)
    collator = AnswerOnlyCollator(processor, chat)
    expected = torch.empty(5, 37)
    with torch.no_grad():
        for row in range(5):
            batch = collator([{"image": data.test[row]["image"], "label": c} for c in range(37)])
            labels = batch.pop("labels")[:, 1:]
            logp = model(**batch).logits[:, :-1].log_softmax(-1)
            token_logp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            expected[row] = (token_logp * (labels != -100)).sum(1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert scores.std(1).min() > 0  # the names really get different scores


def test_generated_text_is_matched_to_the_longest_breed_name() -> None:
    names = [readable_name(b) for b in BREEDS]
    assert match_name("It is an american pit bull terrier.", names) == names.index(
        "American Pit Bull Terrier"
    )
    assert match_name("Pug<end_of_turn>", names) == names.index("Pug")
    assert match_name("staffordshire_bull_terrier", names) == names.index("Staffordshire Bull Terrier")
    assert match_name("a cat, I think", names) == UNKNOWN
    assert summary_metrics([0, 1, 2, 3], [0, 1, UNKNOWN, UNKNOWN]) == {
        "accuracy": 0.5,
        "macro_f1": 0.5,
        "unknown_rate": 0.5,
    }


def test_lora_goes_on_the_language_model_only(tiny_model: Path) -> None:
    model = load_model(str(tiny_model), "fp32", "cpu", None, 4, 8, 0.0)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all("language_model" in name and "lora_" in name for name in trainable)
    assert not any(param.requires_grad for name, param in model.named_parameters() if "vision_tower" in name)


def test_the_model_loads_without_kernels_from_the_hub(tiny_model: Path) -> None:
    # transformers' default would fetch layers' kernels from the Hub at load: unpinned code, and on a GPU
    # without the Hub (or with a publisher it cannot verify) the load fails.
    model = load_model(str(tiny_model), "fp32", "cpu", None, 4, 8, 0.0)
    assert model.get_base_model().use_kernels is False


def test_precision_on_cpu_is_fp32_and_4bit_is_refused(tiny_model: Path) -> None:
    assert choose_precision("auto", "cpu", str(tiny_model), None) == "fp32"
    assert choose_precision("none", "cpu", str(tiny_model), None) == "fp32"
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        choose_precision("4bit", "cpu", str(tiny_model), None)


def test_resume_picks_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    assert last_complete_checkpoint(tmp_path) is None
    for step in (50, 100, 150):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (50, 100):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    # checkpoint-150 lacks trainer_state.json: the task died while writing it.
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-100"
