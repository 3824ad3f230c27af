"""Cloud Build's substitutions: `$_NAME`, `${_NAME}` and the built-ins, checked as CreateBuild checks them.

https://cloud.google.com/build/docs/configuring-builds/substitute-variable-values
"""

from __future__ import annotations

import re

from google.cloud.devtools import cloudbuild_v1

from launcher.emulator.access import project_number
from launcher.emulator.rpc import invalid

BUILD_NAME = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/builds/(?P<id>[^/]+)$")
_SUBSTITUTION_KEY = re.compile(r"^_[A-Z0-9_]+$")
_BUILD_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_REFERENCE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_BUILT_INS = [
    "PROJECT_ID",
    "BUILD_ID",
    "PROJECT_NUMBER",
    "LOCATION",
    "TRIGGER_NAME",
    "COMMIT_SHA",
    "REVISION_ID",
    "SHORT_SHA",
    "REPO_NAME",
    "REPO_FULL_NAME",
    "BRANCH_NAME",
    "TAG_NAME",
    "REF_NAME",
    "TRIGGER_BUILD_CONFIG_PATH",
    "SERVICE_ACCOUNT_EMAIL",
    "SERVICE_ACCOUNT",
]


def _substitute(text: str, values: dict[str, str], used: set[str], loose: bool) -> str:
    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        key = match[1] or match[2]
        if key in values:
            used.add(key)
            return values[key]
        if loose:
            return ""
        if key.startswith("_"):
            raise invalid(
                f"invalid value for 'build.substitutions': key in the template {key!r} is not matched in the "
                "substitution data"
            )
        raise invalid(
            f"invalid value for 'build.substitutions': key in the template {key!r} is not a valid built-in "
            "substitution"
        )

    return _REFERENCE.sub(replace, text)


def resolved(build: cloudbuild_v1.Build) -> cloudbuild_v1.Build:
    """The build with its substitutions applied, validated as CreateBuild validates them."""
    for key in build.substitutions:
        if key not in _BUILT_INS and not _SUBSTITUTION_KEY.match(key):
            raise invalid(
                f"invalid value for 'build.substitutions': substitution key {key!r} does not respect format "
                "'^_[A-Z0-9_]+$'"
            )
    location = BUILD_NAME.match(build.name)
    assert location
    values = {key: "" for key in _BUILT_INS}
    values.update(
        PROJECT_ID=build.project_id,
        BUILD_ID=build.id,
        PROJECT_NUMBER=project_number(build.project_id),
        LOCATION=location["location"],
    )
    values.update(build.substitutions)
    loose = build.options.substitution_option == cloudbuild_v1.BuildOptions.SubstitutionOption.ALLOW_LOOSE
    used: set[str] = set()
    resolved = cloudbuild_v1.Build(build)

    def sub(text: str) -> str:
        return _substitute(text, values, used, loose)

    for step in resolved.steps:
        step.name = sub(step.name)
        step.args = [sub(arg) for arg in step.args]
        step.env = [sub(env) for env in step.env]
        step.dir_ = sub(step.dir_)
        step.entrypoint = sub(step.entrypoint)
    resolved.images = [sub(image) for image in resolved.images]
    resolved.tags = [sub(tag) for tag in resolved.tags]
    # Build tags (not image tags), checked once substituted, as CreateBuild answers, e.g.
    # github.com/kubernetes/cloud-provider-gcp/pull/810 ("invalid build tag "ccm/v32.2.0": must match format
    # ...") for the tags field of https://cloud.google.com/build/docs/build-config-file-schema#tags.
    for tag in resolved.tags:
        if not _BUILD_TAG.match(tag):
            raise invalid(
                f'invalid build: invalid build tag "{tag}": must match format "{_BUILD_TAG.pattern}"'
            )
    unused = sorted(set(build.substitutions) - used)
    if unused and not loose:
        raise invalid(
            f"invalid value for 'build.substitutions': key {unused[0]!r} in the substitution data is not "
            "matched in the template"
        )
    return resolved
