"""Errors a user can cause or fix. Each message says what was wrong, the value, and what to do.

The CLI prints ``error: <message>`` for these and exits non-zero without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NodewiseError(Exception):
    """Base of every error nodewise raises on purpose."""

    exit_code = 1


class InvalidModelURI(NodewiseError, ValueError):
    """A model URI that is not ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""

    exit_code = 2


class ModelNotFound(NodewiseError, LookupError):
    """No such registered model, version or alias."""


class RegistryUnreachable(NodewiseError, ConnectionError):
    """The MLflow registry did not answer."""


class UnsupportedModel(NodewiseError, TypeError):
    """A model whose flavour nodewise cannot serve."""


class DoesNotFit(NodewiseError, RuntimeError):
    """The placement plan found no layout with enough memory."""


class ClusterUnavailable(NodewiseError, ConnectionError):
    """The Ray cluster could not be started or reached."""


class DeployFailed(NodewiseError, RuntimeError):
    """The deployment did not become healthy or failed its smoke test; it was rolled back."""


class InvalidInventory(NodewiseError, ValueError):
    """An inventory source that cannot be read or makes no sense."""

    exit_code = 2


class InvalidModelConfig(NodewiseError, ValueError):
    """A model config (JSON) or dtype that cannot be profiled."""

    exit_code = 2
