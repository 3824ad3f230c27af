"""A synthetic dataset in the exact Oxford-IIIT Pet layout, with breeds learnable from pixels.

    python -m trainer.offline.synthetic OUT_DIR [--per-class N] [--test-per-class M] [--seed S]

Writes OUT_DIR/images/<Breed>_<n>.jpg and OUT_DIR/annotations/{list,trainval,test}.txt. Like the real set,
cat breeds are capitalised and dog breeds lower case, and a few ".jpg" files are really grayscale,
RGBA or palette images, so the loader's RGB conversion is exercised.
"""

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

# The 37 breeds in the official class-id order (case-insensitive alphabetical, as in list.txt).
BREEDS = [
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal",
    "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel",
    "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
    "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug",
    "Ragdoll", "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese",
    "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
]  # fmt: skip

LIST_HEADER = """#Image CLASS-ID SPECIES BREED ID
#ID: 1:37 Class ids
#SPECIES: 1:Cat 2:Dog
#BREED ID: 1-25:Cat 1:12:Dog
#All images with 1st letter as captial are cat images
#images with small first letter are dog images
"""

# Three colours whose brightness differs too, so that grayscale images keep the code.
COLOURS = [(30, 30, 160), (40, 170, 40), (250, 230, 60)]


def draw_pet(class_index: int, rng: random.Random) -> Image.Image:
    """The breed's index in base 3 gives the colours of the four quadrants (the tiny model's four image
    tokens at 32 px), drawn with jittered shades and edges, on images of varying size."""
    width, height = rng.randint(48, 96), rng.randint(48, 96)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    mid_x = width // 2 + rng.randint(-3, 3)
    mid_y = height // 2 + rng.randint(-3, 3)
    boxes = [
        (0, 0, mid_x, mid_y),
        (mid_x, 0, width, mid_y),
        (0, mid_y, mid_x, height),
        (mid_x, mid_y, width, height),
    ]
    for quadrant, box in enumerate(boxes):
        colour = COLOURS[class_index // 3**quadrant % 3]
        draw.rectangle(box, fill=tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in colour))
    for _ in range(6):  # clutter, so no two images are alike
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x, y, x + 6, y + 6), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def save_image(image: Image.Image, path: Path, number: int) -> None:
    """Every 7th image is grayscale, every 11th RGBA and every 13th palette, saved as PNG under a .jpg name
    as some of the real set's files are."""
    if number % 7 == 0:
        image.convert("L").save(path, format="JPEG", quality=90)
    elif number % 11 == 0:
        image.convert("RGBA").save(path, format="PNG")
    elif number % 13 == 0:
        image.convert("P", palette=Image.Palette.ADAPTIVE).save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=90)


def write_dataset(out_dir: Path, per_class: int = 20, test_per_class: int = 6, seed: int = 0) -> None:
    rng = random.Random(seed)
    images_dir, annotations_dir = out_dir / "images", out_dir / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations_dir.mkdir(parents=True, exist_ok=True)
    cats = [b for b in BREEDS if b[0].isupper()]
    dogs = [b for b in BREEDS if b[0].islower()]
    rows, trainval, test = [], [], []
    for class_index, breed in enumerate(BREEDS):
        species, breed_id = (1, cats.index(breed) + 1) if breed in cats else (2, dogs.index(breed) + 1)
        for number in range(1, per_class + test_per_class + 1):
            name = f"{breed}_{number}"
            save_image(draw_pet(class_index, rng), images_dir / f"{name}.jpg", number)
            row = f"{name} {class_index + 1} {species} {breed_id}\n"
            rows.append(row)
            (trainval if number <= per_class else test).append(row)
    (annotations_dir / "trainval.txt").write_text("".join(trainval))
    (annotations_dir / "test.txt").write_text("".join(test))
    (annotations_dir / "list.txt").write_text(LIST_HEADER + "".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.offline.synthetic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-class", type=int, default=20, help="trainval images per breed")
    parser.add_argument("--test-per-class", type=int, default=6, help="test images per breed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_dataset(args.out_dir, args.per_class, args.test_per_class, args.seed)
    print(f"wrote {len(BREEDS) * (args.per_class + args.test_per_class)} images to {args.out_dir}")


if __name__ == "__main__":
    main()
