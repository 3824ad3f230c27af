"""Artifact Registry v1: repositories (create and delete are long-running) and Docker images.

Images get here from the Cloud Build emulator through `record_image`; the Cloud Run emulator finds
the image a job names through `find_image`.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import grpc
from google.cloud import artifactregistry_v1
from google.iam.v1 import iam_policy_pb2
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2

from launcher.emulator.access import Access, rename_member
from launcher.emulator.operations import Operations
from launcher.emulator.resourcemanager import (
    policy_as_requested,
    policy_from,
    replaced_policy,
    validate_policy,
)
from launcher.emulator.rpc import (
    Hub,
    Method,
    already_exists,
    failed_precondition,
    iam_policy_methods,
    invalid,
    not_found,
    service_handler,
    to_dict,
)
from launcher.emulator.state import State

_LOCATION = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)$")
_REPOSITORY = re.compile(
    r"^(?P<parent>projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+))/repositories/(?P<repo>[^/]+)$"
)
_REPOSITORY_ID = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_REGION = re.compile(r"^(?:[a-z]+-[a-z]+\d+|us|europe|asia)$")
_DOCKER_IMAGE = re.compile(
    r"^(?P<repository>.+/repositories/[^/]+)/dockerImages/(?P<image>[^/]+)@(?P<digest>[^/@]+)$"
)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_IMAGE_PATH = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_URI = re.compile(
    r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[^/]+)/(?P<repo>[^/]+)/(?P<reference>.+)$"
)
# What GetIamPolicy answers for a repository nobody granted anything on.
_EMPTY_POLICY = {"version": 1, "etag": "ACAB"}
# Roles grantable on a repository: Artifact Registry's own and the basic ones.
_REPOSITORY_ROLE = re.compile(r"^roles/(?:owner|editor|viewer|artifactregistry\.[a-zA-Z]+)$")
_ORDER_FIELDS = {"name", "update_time", "upload_time", "build_time"}

Format = artifactregistry_v1.Repository.Format


def _now() -> datetime:
    return datetime.now(UTC)


def _page(items: list[Any], page_size: int, page_token: str) -> tuple[list[Any], str]:
    if page_token and not page_token.isdigit():
        raise invalid(f"Invalid page token {page_token!r}.")
    start = int(page_token or 0)
    end = len(items) if page_size <= 0 else start + page_size
    return items[start:end], str(end) if end < len(items) else ""


def _image_name(repository: str, image: str, digest: str) -> str:
    # The real API escapes the slashes of a nested image path inside the resource name.
    return f"{repository}/dockerImages/{quote(image, safe='')}@{digest}"


class ArtifactRegistry:
    def __init__(self, state: State, operations: Operations, access: Access) -> None:
        self.state = state
        self.operations = operations
        self.access = access
        access.add_policy_source(r"^projects/[^/]+/locations/[^/]+/repositories/[^/]+", self._policies_of)
        access.add_member_renamer(self._rename_member)

    def _policies_of(self, name: str) -> list[dict[str, Any]]:
        policy = self.state.table("repository_policies").get(name)
        return [policy] if policy else []

    def _rename_member(self, old: str, new: str) -> None:
        with self.state.transaction() as tables:
            for policy in tables["repository_policies"].values():
                rename_member(policy, old, new)

    def _repository(self, name: str) -> artifactregistry_v1.Repository:
        if not _REPOSITORY.match(name):
            raise invalid(
                f"Invalid repository name {name!r}: expected projects/P/locations/L/repositories/R."
            )
        stored = self.state.table("repositories").get(name)
        if stored is None:
            raise not_found(f"Repository {name}")
        return artifactregistry_v1.Repository.from_json(json.dumps(stored))

    @staticmethod
    def _image(stored: dict[str, Any]) -> artifactregistry_v1.DockerImage:
        return artifactregistry_v1.DockerImage.from_json(json.dumps(stored))

    # ---- repositories ---------------------------------------------------------------------------

    def create_repository(
        self, request: artifactregistry_v1.CreateRepositoryRequest, context: grpc.ServicerContext
    ):
        parent = _LOCATION.match(request.parent)
        if not parent:
            raise invalid(f"Invalid parent {request.parent!r}: expected projects/PROJECT/locations/LOCATION.")
        if not _REGION.match(parent["location"]):
            raise invalid(f"Invalid location {parent['location']!r}.")
        if not _REPOSITORY_ID.match(request.repository_id):
            raise invalid(
                f"Invalid repository id {request.repository_id!r}: up to 63 lower-case letters, digits and "
                "hyphens, starting with a letter and ending with a letter or digit."
            )
        repository = request.repository
        if repository.format_ == Format.FORMAT_UNSPECIFIED:
            raise invalid("Repository.format must be set (DOCKER, PYTHON, ...).")
        name = f"{request.parent}/repositories/{request.repository_id}"
        now = _now()
        repository.name = name
        repository.create_time = now
        repository.update_time = now
        if repository.mode == artifactregistry_v1.Repository.Mode.MODE_UNSPECIFIED:
            repository.mode = artifactregistry_v1.Repository.Mode.STANDARD_REPOSITORY
        host = f"{parent['location']}-{repository.format_.name.lower()}.pkg.dev"
        repository.registry_uri = f"{host}/{parent['project']}/{request.repository_id}"
        with self.state.transaction() as tables:
            if name in tables["repositories"]:
                raise already_exists(f"Repository {name}")
            tables["repositories"][name] = to_dict(repository)
        return self.operations.start(request.parent, repository, artifactregistry_v1.OperationMetadata())

    def get_repository(
        self, request: artifactregistry_v1.GetRepositoryRequest, context: grpc.ServicerContext
    ):
        return self._repository(request.name)

    def list_repositories(
        self, request: artifactregistry_v1.ListRepositoriesRequest, context: grpc.ServicerContext
    ):
        if not _LOCATION.match(request.parent):
            raise invalid(f"Invalid parent {request.parent!r}: expected projects/PROJECT/locations/LOCATION.")
        if request.filter or request.order_by not in ("", "name"):
            raise invalid("The emulator supports neither filters nor orderings other than 'name' here.")
        prefix = f"{request.parent}/repositories/"
        stored = self.state.table("repositories")
        names = sorted(name for name in stored if name.startswith(prefix))
        page, token = _page(names, request.page_size, request.page_token)
        return artifactregistry_v1.ListRepositoriesResponse(
            repositories=[artifactregistry_v1.Repository.from_json(json.dumps(stored[n])) for n in page],
            next_page_token=token,
        )

    def delete_repository(
        self, request: artifactregistry_v1.DeleteRepositoryRequest, context: grpc.ServicerContext
    ):
        # A long-running operation that deletes every image in the repository with it
        # (https://cloud.google.com/artifact-registry/docs/repositories/delete).
        self._repository(request.name)
        with self.state.transaction() as tables:
            tables["repositories"].pop(request.name, None)
            # Its policy goes with it: a repository created again under the name starts with none.
            tables["repository_policies"].pop(request.name, None)
            for image in [n for n in tables["docker_images"] if n.startswith(f"{request.name}/")]:
                del tables["docker_images"][image]
        parent = _REPOSITORY.match(request.name)
        assert parent
        return self.operations.start(
            parent["parent"], empty_pb2.Empty(), artifactregistry_v1.OperationMetadata()
        )

    # ---- repository IAM (https://cloud.google.com/artifact-registry/docs/access-control#grant-repo) --

    def get_iam_policy(self, request: iam_policy_pb2.GetIamPolicyRequest, context: grpc.ServicerContext):
        self._repository(request.resource)
        stored = self.state.table("repository_policies").get(request.resource) or _EMPTY_POLICY
        # GetIamPolicyRequest.options (google/iam/v1/iam_policy.proto) applies to every IAM resource:
        # below version 3 a conditional binding reads as ROLE_withcond_HASH, as for projects.
        return policy_as_requested(policy_from(stored), request)

    def set_iam_policy(self, request: iam_policy_pb2.SetIamPolicyRequest, context: grpc.ServicerContext):
        self._repository(request.resource)
        validate_policy(request.policy, self.access, _REPOSITORY_ROLE)
        with self.state.transaction() as tables:
            current = tables["repository_policies"].get(request.resource) or _EMPTY_POLICY
            tables["repository_policies"][request.resource] = replaced_policy(
                current, request.policy, request.resource
            )
            self.access.policy_replaced(current, tables["repository_policies"][request.resource])
            return policy_from(tables["repository_policies"][request.resource])

    # ---- Docker images --------------------------------------------------------------------------

    def list_docker_images(
        self, request: artifactregistry_v1.ListDockerImagesRequest, context: grpc.ServicerContext
    ):
        self._repository(request.parent)
        field, _, direction = request.order_by.strip().partition(" ")
        field = field or "name"
        if field not in _ORDER_FIELDS or direction.strip() not in ("", "asc", "desc"):
            raise invalid(f"Unsupported order_by {request.order_by!r}.")
        prefix = f"{request.parent}/dockerImages/"
        images = [
            self._image(v) for k, v in self.state.table("docker_images").items() if k.startswith(prefix)
        ]
        images.sort(key=lambda image: getattr(image, field), reverse=direction.strip() == "desc")
        page, token = _page(images, request.page_size, request.page_token)
        return artifactregistry_v1.ListDockerImagesResponse(docker_images=page, next_page_token=token)

    def get_docker_image(
        self, request: artifactregistry_v1.GetDockerImageRequest, context: grpc.ServicerContext
    ):
        match = _DOCKER_IMAGE.match(request.name)
        if not match:
            raise invalid(
                f"Invalid docker image name {request.name!r}: "
                "expected .../repositories/R/dockerImages/IMAGE@DIGEST."
            )
        self._repository(match["repository"])
        stored = self.state.table("docker_images").get(request.name)
        if stored is None:
            raise not_found(f"Docker image {request.name}")
        return self._image(stored)

    # ---- for the other emulated services --------------------------------------------------------

    def record_image(
        self, repository: str, image: str, digest: str, tags: list[str]
    ) -> artifactregistry_v1.DockerImage:
        """Record a pushed image (as Cloud Build does); `tags` move here from older digests of `image`.

        Raises ApiError NOT_FOUND when the repository does not exist, FAILED_PRECONDITION when it is not
        a Docker repository or a tag would move in a repository with immutable tags, INVALID_ARGUMENT for
        a malformed image path, digest or tag.
        """
        match = _REPOSITORY.match(repository)
        found = self._repository(repository)
        assert match
        if found.format_ != Format.DOCKER:
            raise failed_precondition(
                f"Repository {repository} is a {found.format_.name} repository, not DOCKER."
            )
        if not _IMAGE_PATH.match(image):
            raise invalid(f"Invalid image path {image!r}.")
        if not _DIGEST.match(digest):
            raise invalid(f"Invalid digest {digest!r}: expected sha256:<64 hex digits>.")
        if bad := [tag for tag in tags if not _TAG.match(tag)]:
            raise invalid(f"Invalid tag(s): {', '.join(bad)}.")
        name = _image_name(repository, image, digest)
        same_image = _image_name(repository, image, "")
        now = _now()
        with self.state.transaction() as tables:
            images = tables["docker_images"]
            # DockerRepositoryConfig.immutable_tags (proto comment): "prevents all tags from being
            # modified, moved or deleted. This does not prevent tags from being created."
            if found.docker_config.immutable_tags:
                moved = [
                    tag
                    for other_name, stored in images.items()
                    if other_name.startswith(same_image) and other_name != name
                    for tag in stored.get("tags", [])
                    if tag in tags
                ]
                if moved:
                    raise failed_precondition(
                        f"Tag {moved[0]!r} of image {image} already exists in repository {repository}, "
                        "which has immutable tags: it cannot be moved to another image."
                    )
            for other_name, stored in images.items():
                if other_name.startswith(same_image) and other_name != name:
                    stored["tags"] = [tag for tag in stored.get("tags", []) if tag not in tags]
            if name in images:
                recorded = self._image(images[name])
                recorded.tags = list(dict.fromkeys([*recorded.tags, *tags]))
            else:
                recorded = artifactregistry_v1.DockerImage(
                    name=name,
                    uri=f"{match['location']}-docker.pkg.dev/{match['project']}/{match['repo']}/{image}@{digest}",
                    tags=list(dict.fromkeys(tags)),
                    media_type="application/vnd.docker.distribution.manifest.v2+json",
                    upload_time=now,
                    build_time=now,
                )
            recorded.update_time = now
            images[name] = to_dict(recorded)
        return recorded

    def find_image(self, uri: str) -> artifactregistry_v1.DockerImage | None:
        """The image that LOCATION-docker.pkg.dev/PROJECT/REPO/IMAGE[:TAG|@sha256:...] names, if any.

        No tag and no digest means the tag "latest", as with docker pull.
        """
        match = _URI.match(uri)
        if not match:
            return None
        repository = f"projects/{match['project']}/locations/{match['location']}/repositories/{match['repo']}"
        reference = match["reference"]
        images = self.state.table("docker_images")
        if "@" in reference:
            image, _, digest = reference.partition("@")
            stored = images.get(_image_name(repository, image, digest))
            return self._image(stored) if stored else None
        path, _, last = reference.rpartition("/")
        image, _, tag = last.partition(":")
        image = f"{path}/{image}" if path else image
        prefix = _image_name(repository, image, "")
        for name, stored in images.items():
            if name.startswith(prefix) and (tag or "latest") in stored.get("tags", []):
                return self._image(stored)
        return None

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        iam_methods = iam_policy_methods(self.get_iam_policy, self.set_iam_policy)
        ar = artifactregistry_v1
        return service_handler(
            "google.devtools.artifactregistry.v1.ArtifactRegistry",
            [
                Method(
                    "CreateRepository",
                    self.create_repository,
                    ar.CreateRepositoryRequest,
                    operations_pb2.Operation,
                ),
                Method("GetRepository", self.get_repository, ar.GetRepositoryRequest, ar.Repository),
                Method(
                    "ListRepositories",
                    self.list_repositories,
                    ar.ListRepositoriesRequest,
                    ar.ListRepositoriesResponse,
                ),
                Method(
                    "DeleteRepository",
                    self.delete_repository,
                    ar.DeleteRepositoryRequest,
                    operations_pb2.Operation,
                ),
                Method(
                    "ListDockerImages",
                    self.list_docker_images,
                    ar.ListDockerImagesRequest,
                    ar.ListDockerImagesResponse,
                ),
                Method("GetDockerImage", self.get_docker_image, ar.GetDockerImageRequest, ar.DockerImage),
                *iam_methods,
            ],
            hub,
        )
