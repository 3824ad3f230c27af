"""setup.py exists only so the wheel carries the top-level files an image build needs.

An installed gemma-launch (pip install ., pipx install .) builds the job's image without a checkout;
launcher/image_source.py finds these copies in launcher/_project/. Everything else is in pyproject.toml.
"""

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from launcher.image_source import PACKAGED, PROJECT_FILES  # noqa: E402


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        # An editable install runs from the checkout, which has the files themselves.
        if self.editable_mode:
            return
        target = Path(self.build_lib, "launcher", PACKAGED)
        target.mkdir(parents=True, exist_ok=True)
        for name in PROJECT_FILES:
            shutil.copyfile(ROOT / name, target / name)


setup(cmdclass={"build_py": BuildPy})
