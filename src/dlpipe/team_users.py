"""`python -m dlpipe.team_users NAME --role ROLE`: an admin adds a teammate to the authenticated
team server (or changes their role or password), with MLflow's own basic-auth client.

    MLFLOW_TRACKING_URI=http://mlflow.example:5000 \\
    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \\
    python -m dlpipe.team_users ben --role trainer      # asks for ben's password

Every user reads everything (the server's `default_permission = READ`); a role adds, on the
experiment in params.yaml and on each model's registered name:
  viewer      nothing more: can neither log a run nor register a version nor move an alias
  trainer     EDIT: logs runs, registers versions and moves `champion`/`candidate` (the evaluate
              stage does both; MLflow grants them together)
  maintainer  MANAGE: also deletes runs and versions, and grants permissions on them
The new user's password comes from DLPIPE_NEW_USER_PASSWORD or a prompt, never from params.
Rerun after adding a model to params.yaml: grants are per registered model.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
from collections.abc import Sequence

from mlflow.exceptions import MlflowException

from dlpipe.config import load_params
from dlpipe.errors import DlpipeError, exit_on_user_error, first_line
from dlpipe.registry import registered_name
from dlpipe.tracking.store import check_store, experiment_id, tracking_uri

ROLES = {"viewer": None, "trainer": "EDIT", "maintainer": "MANAGE"}


def new_password(name: str) -> str:
    password = os.environ.get("DLPIPE_NEW_USER_PASSWORD") or getpass.getpass(
        f"password for {name}: "
    )
    if len(password) < 12:
        raise DlpipeError(f"the password for {name} must be at least 12 characters")
    return password


def add_user(name: str, role: str, password: str, params_path: str = "params.yaml") -> list[str]:
    """Create `name` (or set their password) and grant `role`; what was granted, one per line."""
    from mlflow.server import get_app_client

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise DlpipeError(f"MLFLOW_TRACKING_URI is {uri}: users live on a tracking server")
    check_store(uri, reading=True)
    params = load_params(params_path)
    auth = get_app_client("basic-auth", tracking_uri=uri)
    try:
        try:
            auth.create_user(name, password)
            done = [f"user {name} created"]
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            auth.update_user_password(name, password)
            done = [f"user {name} exists: password changed"]
        permission = ROLES[role]
        resources = [("experiment", experiment_id(params.mlflow.experiment, uri))] + [
            ("registered_model", registered_name(model, params.registry)) for model in params.train
        ]
        for kind, resource in resources:
            if permission is None:  # a trainer made a viewer loses the grants
                with contextlib.suppress(MlflowException):  # none to revoke
                    auth.revoke_user_permission(name, kind, resource)
            else:
                auth.grant_user_permission(name, kind, resource, permission)
                done.append(f"{permission} on {kind.replace('_', ' ')} {resource}")
        if permission is None:
            done.append(f"{name} reads everything and writes nothing")
        return done
    except MlflowException as err:
        raise DlpipeError(f"MLflow server refused: {first_line(err)}") from None


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dlpipe.team_users",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name")
    parser.add_argument("--role", choices=sorted(ROLES), required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    for line in add_user(args.name, args.role, new_password(args.name), args.params):
        print(line)


if __name__ == "__main__":
    main()
