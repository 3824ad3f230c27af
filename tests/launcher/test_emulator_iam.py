import pytest
from google.api_core import exceptions


def test_service_account_create_get_and_conflict(local):
    iam = local.clients().iam
    account = iam.create_service_account(
        request={"name": "projects/demo-project", "account_id": "gemma-trainer"}
    )
    assert account.email == "gemma-trainer@demo-project.iam.gserviceaccount.com"
    assert iam.get_service_account(name=account.name).email == account.email
    with pytest.raises(exceptions.AlreadyExists):
        iam.create_service_account(request={"name": "projects/demo-project", "account_id": "gemma-trainer"})
    methods = [entry["method"] for entry in local.record()]
    assert methods == ["CreateServiceAccount", "GetServiceAccount", "CreateServiceAccount"]


@pytest.mark.parametrize("account_id", ["ab", "Upper-case", "ends-with-", "9starts-with-digit"])
def test_service_account_rejects_names_iam_rejects(local, account_id):
    with pytest.raises(exceptions.InvalidArgument):
        local.clients().iam.create_service_account(
            request={"name": "projects/demo-project", "account_id": account_id}
        )


def test_unknown_service_account_is_not_found(local):
    with pytest.raises(exceptions.NotFound):
        local.clients().iam.get_service_account(
            name="projects/demo-project/serviceAccounts/nobody@demo-project.iam.gserviceaccount.com"
        )


@pytest.mark.parametrize(
    "account", [{"display_name": "x" * 101}, {"display_name": "é" * 51}, {"description": "x" * 257}]
)
def test_service_account_display_name_and_description_have_byte_limits(local, account):
    # iam.proto: display_name at most 100 UTF-8 bytes, description at most 256.
    with pytest.raises(exceptions.InvalidArgument, match="UTF-8 bytes"):
        local.clients().iam.create_service_account(
            request={
                "name": "projects/demo-project",
                "account_id": "gemma-trainer",
                "service_account": account,
            }
        )
    local.clients().iam.create_service_account(
        request={
            "name": "projects/demo-project",
            "account_id": "gemma-trainer",
            "service_account": {"display_name": "x" * 100, "description": "x" * 256},
        }
    )
