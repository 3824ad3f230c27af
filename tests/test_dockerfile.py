"""The image as the Dockerfile defines it: base images pinned by digest, caches where its user can write."""

import re
from pathlib import Path

from launcher.emulator.dockerfile import parse

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = parse((REPO / "Dockerfile").read_text())
# name:tag@sha256:<64 hex>: the digest is what Docker pulls, the tag says what it is.
PINNED = re.compile(r"[^\s@:]+(?::\d+)?(?:/[^\s@:]+)*:[\w.-]+@sha256:[0-9a-f]{64}")


def test_every_base_image_is_pinned_by_digest_and_keeps_its_tag() -> None:
    stages: set[str] = set()
    unpinned = []
    for instruction in DOCKERFILE.instructions:
        words = instruction.arguments.split()
        if instruction.keyword == "FROM":
            image = words[0]
            if image.lower() not in stages and not PINNED.fullmatch(image):
                unpinned.append(f"line {instruction.line}: FROM {image}")
            if len(words) == 3:
                stages.add(words[2].lower())
        elif instruction.keyword == "COPY":
            source = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            if source and source.lower() not in stages and not PINNED.fullmatch(source):
                unpinned.append(f"line {instruction.line}: COPY --from={source}")
    assert stages, "the Dockerfile names its stages"
    assert unpinned == []


def test_home_and_every_cache_are_under_tmp_not_the_bucket_mount() -> None:
    # Cloud Run's writable places are /tmp (memory) and the bucket mount; uid 10001 has no home of its own.
    env = DOCKERFILE.config.env
    caches = ["HOME", "XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR", "TRITON_HOME", "TRITON_CACHE_DIR"]
    caches += ["TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH"]
    assert {name: env.get(name) for name in caches if not (env.get(name) or "").startswith("/tmp")} == {}
    assert DOCKERFILE.config.user == "10001:10001"
