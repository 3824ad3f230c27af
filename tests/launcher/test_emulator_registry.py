import pytest
from google.api_core import exceptions
from google.cloud import artifactregistry_v1

from launcher.emulator.rpc import ApiError

PARENT = "projects/demo-project/locations/europe-west4"
REPO = f"{PARENT}/repositories/gemma"
HOST = "europe-west4-docker.pkg.dev/demo-project/gemma"
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def _create(registry, repository_id: str = "gemma", fmt=artifactregistry_v1.Repository.Format.DOCKER):
    return registry.create_repository(
        request={
            "parent": PARENT,
            "repository_id": repository_id,
            "repository": {"format_": fmt, "description": "Gemma images"},
        }
    )


def test_create_repository_is_long_running_and_polled(local):
    registry = local.clients().registry
    repository = _create(registry).result(timeout=30)
    assert repository.name == REPO
    assert repository.format_ == artifactregistry_v1.Repository.Format.DOCKER
    assert repository.registry_uri == HOST
    assert repository.description == "Gemma images"
    assert registry.get_repository(name=REPO).create_time == repository.create_time
    assert [r.name for r in registry.list_repositories(parent=PARENT)] == [REPO]
    # The operation is not done when CreateRepository answers, so the client had to poll for it.
    methods = [entry["method"] for entry in local.record()]
    assert methods[0] == "CreateRepository"
    assert "GetOperation" in methods


def test_duplicate_repository_is_already_exists(local):
    registry = local.clients().registry
    _create(registry).result(timeout=30)
    with pytest.raises(exceptions.AlreadyExists):
        _create(registry)


@pytest.mark.parametrize("repository_id", ["Gemma", "1gemma", "gemma-", "gem_ma", "g" * 64, ""])
def test_repository_id_rules(local, repository_id):
    with pytest.raises(exceptions.InvalidArgument):
        _create(local.clients().registry, repository_id)


def test_repository_needs_a_format(local):
    with pytest.raises(exceptions.InvalidArgument):
        _create(local.clients().registry, fmt=artifactregistry_v1.Repository.Format.FORMAT_UNSPECIFIED)


def test_delete_repository_removes_it_and_its_images(local):
    registry = local.clients().registry
    _create(registry).result(timeout=30)
    local.emulator.services["registry"].record_image(REPO, "trainer", DIGEST_A, ["latest"])
    registry.delete_repository(name=REPO).result(timeout=30)
    with pytest.raises(exceptions.NotFound):
        registry.get_repository(name=REPO)
    assert local.emulator.services["registry"].find_image(f"{HOST}/trainer:latest") is None
    with pytest.raises(exceptions.NotFound):
        registry.delete_repository(name=REPO)


def test_record_image_moves_tags_and_find_image_resolves_them(local):
    registry = local.clients().registry
    _create(registry).result(timeout=30)
    emulated = local.emulator.services["registry"]
    first = emulated.record_image(REPO, "trainer", DIGEST_A, ["latest", "src-1"])
    assert first.uri == f"{HOST}/trainer@{DIGEST_A}"
    second = emulated.record_image(REPO, "trainer", DIGEST_B, ["latest", "src-2"])

    images = {image.uri: list(image.tags) for image in registry.list_docker_images(parent=REPO)}
    assert images == {
        f"{HOST}/trainer@{DIGEST_A}": ["src-1"],
        f"{HOST}/trainer@{DIGEST_B}": ["latest", "src-2"],
    }
    fetched = registry.get_docker_image(name=second.name)
    assert fetched.uri == second.uri
    newest = registry.list_docker_images(request={"parent": REPO, "order_by": "update_time desc"})
    assert next(iter(newest)).uri == second.uri

    assert emulated.find_image(f"{HOST}/trainer:latest").uri == second.uri
    assert emulated.find_image(f"{HOST}/trainer").uri == second.uri
    assert emulated.find_image(f"{HOST}/trainer:src-1").uri == first.uri
    assert emulated.find_image(f"{HOST}/trainer@{DIGEST_A}").uri == first.uri
    assert emulated.find_image(f"{HOST}/trainer:nope") is None
    assert emulated.find_image(f"{HOST}/other:latest") is None
    assert emulated.find_image("us-docker.pkg.dev/demo-project/gemma/trainer:latest") is None

    # Pushing a digest again adds tags to it instead of recording a second image.
    again = emulated.record_image(REPO, "trainer", DIGEST_A, ["src-3"])
    assert list(again.tags) == ["src-1", "src-3"]
    assert len(list(registry.list_docker_images(parent=REPO))) == 2


def test_nested_image_paths_are_escaped_in_names(local):
    _create(local.clients().registry).result(timeout=30)
    emulated = local.emulator.services["registry"]
    image = emulated.record_image(REPO, "team/trainer", DIGEST_A, ["v1"])
    assert image.name == f"{REPO}/dockerImages/team%2Ftrainer@{DIGEST_A}"
    assert image.uri == f"{HOST}/team/trainer@{DIGEST_A}"
    assert emulated.find_image(f"{HOST}/team/trainer:v1").name == image.name
    assert local.clients().registry.get_docker_image(name=image.name).uri == image.uri


def test_record_image_validates(local):
    registry = local.clients().registry
    emulated = local.emulator.services["registry"]
    with pytest.raises(ApiError) as missing:
        emulated.record_image(REPO, "trainer", DIGEST_A, ["latest"])
    assert missing.value.code.name == "NOT_FOUND"

    _create(registry, "wheels", artifactregistry_v1.Repository.Format.PYTHON).result(timeout=30)
    with pytest.raises(ApiError) as not_docker:
        emulated.record_image(f"{PARENT}/repositories/wheels", "trainer", DIGEST_A, [])
    assert not_docker.value.code.name == "FAILED_PRECONDITION"

    _create(registry).result(timeout=30)
    for image, digest, tags in [
        ("Trainer", DIGEST_A, []),
        ("trainer", "sha256:short", []),
        ("trainer", DIGEST_A, ["-bad"]),
    ]:
        with pytest.raises(ApiError) as bad:
            emulated.record_image(REPO, image, digest, tags)
        assert bad.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(exceptions.NotFound):
        registry.get_docker_image(name=f"{REPO}/dockerImages/trainer@{DIGEST_A}")


def test_a_repository_with_immutable_tags_creates_tags_but_never_moves_them(local):
    registry = local.clients().registry
    registry.create_repository(
        request={
            "parent": PARENT,
            "repository_id": "gemma",
            "repository": {
                "format_": artifactregistry_v1.Repository.Format.DOCKER,
                "docker_config": {"immutable_tags": True},
            },
        }
    ).result(timeout=30)
    assert registry.get_repository(name=REPO).docker_config.immutable_tags
    service = local.emulator.services["registry"]
    service.record_image(REPO, "trainer", DIGEST_A, ["latest", "abc"])
    service.record_image(REPO, "trainer", DIGEST_B, ["def"])
    with pytest.raises(ApiError, match="immutable tags"):
        service.record_image(REPO, "trainer", DIGEST_B, ["latest"])
    assert service.find_image(f"{HOST}/trainer:latest").name.endswith(DIGEST_A)


def test_a_repository_policy_with_conditions_is_read_and_written_only_as_version_3(local):
    # google/iam/v1/policy.proto, Policy.version; https://cloud.google.com/iam/docs/troubleshooting-withcond
    registry = local.clients().registry
    _create(registry).result()
    reader = "user:reader@example.com"
    expiring = {"title": "until 2030", "expression": "request.time < timestamp('2030-01-01T00:00:00Z')"}
    v3 = {"requested_policy_version": 3}
    policy = registry.get_iam_policy(request={"resource": REPO, "options": v3})
    policy.version = 3
    policy.bindings.add(role="roles/artifactregistry.reader", members=[reader], condition=expiring)
    registry.set_iam_policy(request={"resource": REPO, "policy": policy})

    v1 = registry.get_iam_policy(request={"resource": REPO})
    assert v1.version == 1
    assert v1.bindings[0].role.startswith("roles/artifactregistry.reader_withcond_")
    assert not v1.bindings[0].HasField("condition")
    with pytest.raises(exceptions.InvalidArgument, match="version 3"):
        registry.set_iam_policy(request={"resource": REPO, "policy": v1})

    read = registry.get_iam_policy(request={"resource": REPO, "options": v3})
    assert read.version == 3 and read.bindings[0].condition.title == "until 2030"
    with pytest.raises(exceptions.InvalidArgument, match="requested policy version"):
        registry.get_iam_policy(request={"resource": REPO, "options": {"requested_policy_version": 2}})
