"""Registers the suite's fixtures, which live with their helpers in tests/support/, one module
per concern: servers, postgres, archives (raw downloads), tiny (a tiny project), trained (tiny
trained models and a registry), mirror (the real data), families."""

from support.archives import make_acl_archive, make_csv_export  # noqa: F401
from support.mirror import data_mirror  # noqa: F401
from support.postgres import postgres_uri  # noqa: F401
from support.servers import closed_port, http_server, killable_mlflow_server, mlflow_server  # noqa: F401
from support.tiny import _mlflow_db_template, tiny_project  # noqa: F401
from support.trained import registry_store, trained_folders  # noqa: F401
