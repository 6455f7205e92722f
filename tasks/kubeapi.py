"""The Kubernetes API client: one place loads the kubeconfig (or the in-cluster config).

Used by the node inventory (``--inventory k8s``), ``render --apply`` and the watchdog's
Kubernetes passes. ``KUBECONFIG`` is read at call time, not at import.
"""

from __future__ import annotations

from typing import Any

from nodewise.core.errors import KubernetesUnavailable


def api_client(context: str | None = None) -> Any:
    """A client from the kubeconfig (``KUBECONFIG`` or ~/.kube/config), else the in-cluster config."""
    import os

    from kubernetes import client, config

    try:  # KUBECONFIG as it is now (the client reads it once, at import)
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), context=context)
    except (config.ConfigException, OSError, TypeError):
        try:
            config.load_incluster_config()
        except config.ConfigException as e:
            raise KubernetesUnavailable(
                "no Kubernetes configuration found (no kubeconfig, not running in a pod): set KUBECONFIG "
                "to your cluster's kubeconfig"
            ) from e
    return client.ApiClient()
