"""A Hub dataset repository staged into the bucket as is (README + data/*.parquet) loads like the Hub id."""

import datasets
from PIL import Image

from trainer.data import load_pets


def test_staged_hub_dataset_repository_loads_with_its_breed_names(tmp_path):
    names = ["Abyssinian", "american_bulldog", "Bengal"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def split(count: int) -> datasets.Dataset:
        images = [Image.new("RGB", (8, 8), (40 * (i % 3), 0, 0)) for i in range(count)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(count)]}, features)

    (tmp_path / "data").mkdir()
    split(9).to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    split(6).to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    (tmp_path / "README.md").write_text("# a copy of a Hub dataset repository\n")

    data = load_pets(str(tmp_path), train_size=6, eval_size=3, seed=0)
    assert len(data.train) == 6 and len(data.test) == 3
    assert [name.lower() for name in data.class_names] == ["abyssinian", "american bulldog", "bengal"]
