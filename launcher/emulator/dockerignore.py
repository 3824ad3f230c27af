"""What a docker build's COPY and ADD can read: the build context less what its ignore file excludes.

Rules, from https://docs.docker.com/build/concepts/context/#dockerignore-files :
- the ignore file is `<Dockerfile>.dockerignore` beside the Dockerfile when there is one, else
  `.dockerignore` at the context's root;
- blank lines and lines starting with `#` are skipped; `!` re-includes, and the last matching line wins;
  `**` matches any number of directories; patterns are relative to the context root;
- the Dockerfile and the ignore file are always sent to the builder, but when a pattern excludes them,
  COPY and ADD cannot read them either.

The matching itself is docker-py's PatternMatcher, which follows moby's rules (a path is excluded when it
or one of its parent directories matches), rather than a second, hand-written copy of them.
"""

from __future__ import annotations

import posixpath

from docker.utils.build import Pattern, PatternMatcher

IGNORE_FILE = ".dockerignore"


def ignore_file(names: set[str], context: str, dockerfile: str) -> str | None:
    """The archive path of the ignore file that applies to a build of `dockerfile` in `context`, if any."""
    for candidate in (f"{dockerfile}{IGNORE_FILE}", posixpath.join(context, IGNORE_FILE)):
        if candidate in names:
            return candidate
    return None


def patterns(text: str) -> list[str]:
    """The patterns of an ignore file, read as the docker CLI (and docker-py) reads them."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


class Excluder:
    def __init__(self, lines: list[str]) -> None:
        self._matcher = PatternMatcher(lines)
        # docker-py appends `!.dockerignore` so that its client always sends the file; the builder still
        # refuses to COPY it when the user's patterns exclude it, so the forced exception is dropped here.
        forced = self._matcher.patterns.pop()
        assert forced.exclusion and forced.cleaned_pattern == Pattern(IGNORE_FILE).cleaned_pattern

    def excluded(self, path: str) -> bool:
        """Whether `path` (relative to the context root) is out of COPY's and ADD's reach."""
        return bool(path) and self._matcher.matches(path)
