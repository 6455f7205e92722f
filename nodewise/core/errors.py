"""Every error nodewise raises on purpose: what a user can cause or fix.

Each message says what was wrong, the value, and what to do. Each class names its exit code:
2 for a value the user gave (a URI, an option, a setting, a file), 3 for something that is not
there or not reachable (a registry, a cluster, a server), 4 for state to look at (a lock held, a
state file damaged), 1 for a deploy or check that ran and failed. The CLI catches
``NodewiseError`` once, prints ``error: <message>`` and exits with ``exit_code``; anything else is
a bug and keeps its traceback.

Errors of the serving processes live in ``serving/errors.py`` (serving imports nothing of ours).
"""

from __future__ import annotations


class NodewiseError(Exception):
    """Base of every error nodewise raises on purpose."""

    exit_code = 1


# -- a value the user gave (exit 2) ---------------------------------------------------------------
class InvalidInput(NodewiseError, ValueError):
    """An option, argument or combination of them that cannot be used as given."""

    exit_code = 2


class InvalidSetting(InvalidInput):
    """A ``NODEWISE_*`` setting that does not validate."""


class InvalidModelURI(InvalidInput):
    """A model URI that is not ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""


class InvalidInventory(InvalidInput):
    """An inventory source that cannot be read or makes no sense."""


class InvalidModelConfig(InvalidInput):
    """A model config (JSON) or dtype that cannot be profiled."""


class InvalidServeOverride(InvalidInput):
    """A ``nodewise.serve.*`` tag on a registered model or version that is not a valid setting."""


# -- something not there or not reachable (exit 3) ------------------------------------------------
class ModelNotFound(NodewiseError, LookupError):
    """No such registered model, version or alias."""

    exit_code = 3


class NotDeployed(NodewiseError, LookupError):
    """No deployment (or watchdog record) of that name here."""

    exit_code = 3


class RegistryUnreachable(NodewiseError, ConnectionError):
    """The MLflow registry did not answer."""

    exit_code = 3


class ClusterUnavailable(NodewiseError, ConnectionError):
    """The Ray cluster or the hosts of a multi-node job could not be started or reached."""

    exit_code = 3


class NotEnoughHosts(ClusterUnavailable):
    """Too few of a multi-node job's hosts (with its spares) answer to relaunch it."""

    def __init__(self, message: str, down: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.down = down or {}


class KubernetesUnavailable(NodewiseError, ConnectionError):
    """No cluster to talk to, or it lacks what the manifests need (an operator's CRD)."""

    exit_code = 3


class PrefectUnavailable(NodewiseError, ConnectionError):
    """No Prefect server configured, or it did not take what was sent."""

    exit_code = 3


class ServiceFailed(NodewiseError, RuntimeError):
    """A service ``nodewise up`` starts did not start (or its port is taken)."""

    exit_code = 3


# -- state to look at (exit 4) ---------------------------------------------------------------------
class LockTimeout(NodewiseError, TimeoutError):
    """Another process held a lock nodewise needs for too long."""

    exit_code = 4


class Busy(NodewiseError, RuntimeError):
    """Another process is doing this right now (a watchdog pass, a running `nodewise up`)."""

    exit_code = 4


class CorruptStateFile(NodewiseError, ValueError):
    """A file of the state folder that is not what nodewise wrote; never reset silently."""

    exit_code = 4


# -- ran and failed (exit 1) ------------------------------------------------------------------------
class UnsupportedModel(NodewiseError, TypeError):
    """A model whose flavour (or architecture) nodewise cannot serve."""


class DoesNotFit(NodewiseError, RuntimeError):
    """The placement plan found no layout with enough memory."""


class DeployFailed(NodewiseError, RuntimeError):
    """The deployment did not become healthy or failed its smoke test; it was rolled back."""


class ProfilingFailed(NodewiseError, RuntimeError):
    """The measurement process failed."""


class WebhookRejected(NodewiseError):
    """A webhook delivery that is not accepted: ``status`` is the HTTP answer (401, 400)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
