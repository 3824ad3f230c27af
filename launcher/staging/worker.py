"""The staging job's program: `python -m launcher.staging.worker --project P --bucket B --kind model
--source ID --revision COMMIT --prefix PREFIX [--kind dataset --source ...]`.

It runs in the project's image as a short CPU Cloud Run job in the bucket's region (in_cloud.py starts
it and writes this argv: `worker_args` there, `parse` here), and moves each Hub repository into the
bucket with the same code as local staging: `hub_source` lists the repo at the commit the launcher
resolved, `stage_source` transfers, verifies and writes the completion marker. The Hub token comes
only from HF_TOKEN, which Cloud Run sets from the secret; it is never an argument. Output is a line at
each quarter of the bytes (with --verbose, one per file), read back by the launcher through Logging.
"""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from launcher.cloud import Clients
from launcher.errors import UserError
from launcher.staging.bucket import stage_source
from launcher.staging.sources import hub_source
from launcher.staging.view import StagingView

KINDS = ("model", "dataset")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[argparse.Namespace]]:
    """The common flags, then one group per `--kind` (each group starts at its --kind)."""
    common = argparse.ArgumentParser(prog="python -m launcher.staging.worker")
    common.add_argument("--project", required=True)
    common.add_argument("--bucket", required=True)
    common.add_argument("--verbose", action="store_true", help="a line per file staged")
    group = argparse.ArgumentParser(prog="python -m launcher.staging.worker ... --kind")
    group.add_argument("--kind", required=True, choices=KINDS)
    group.add_argument("--source", required=True, help="Hub repo id")
    group.add_argument("--revision", required=True, help="commit to stage")
    group.add_argument("--prefix", required=True, help="object prefix in the bucket")
    starts = [index for index, arg in enumerate(argv) if arg == "--kind"]
    if not starts:
        common.error("at least one --kind ... group is required")
    options = common.parse_args(argv[: starts[0]])
    ends = starts[1:] + [len(argv)]
    groups = [group.parse_args(argv[start:end]) for start, end in zip(starts, ends, strict=True)]
    return options, groups


def main(argv: list[str] | None = None) -> int:
    options, groups = parse(sys.argv[1:] if argv is None else argv)
    token = os.environ.get("HF_TOKEN", "").strip() or None
    # Cloud Run's output is not a terminal, so staging prints lines instead of live bars.
    console = Console(file=sys.stdout, highlight=False, markup=False, no_color=True, force_terminal=False)
    view = StagingView(console, verbose=options.verbose)
    client = Clients(options.project).storage
    try:
        # No GET of the bucket: the job's account holds roles/storage.objectUser on it, which has
        # object access but not storage.buckets.get; objects calls are all staging makes.
        bucket = client.bucket(options.bucket)
        for group in groups:
            source = hub_source(group.kind, group.source, group.revision, token, group.prefix)
            outcome = stage_source(client, bucket, source, on_event=view)
            console.print(
                f"{outcome.status}: {source.kind} {source.source} -> gs://{options.bucket}/{source.prefix}/ "
                f"({len(source.items)} files, {source.bytes:,} bytes)",
                soft_wrap=True,
            )
    except UserError as error:
        print(f"Error: {error.message}", file=sys.stderr, flush=True)
        if error.hint:
            print(f"Hint: {error.hint}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
