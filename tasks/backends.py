"""Every backend, registered in one place: a record's ``backend`` -> its implementation.

The interface is tasks/backend.py's ``Backend``; each implementation lives in its backend's room.
Adding a backend is its room (a class with those operations) and one entry in ``BACKENDS``.
"""

from __future__ import annotations

from nodewise.core.errors import InvalidInput
from tasks.backend import Backend
from tasks.k8s.backend import Kubernetes
from tasks.mpi.backend import DeepSpeedMpi
from tasks.rayserve.backend import RayServe

# The order is `nodewise down`'s: DeepSpeed groups stop before the local Ray instance.
BACKENDS: tuple[Backend, ...] = (DeepSpeedMpi(), RayServe(), Kubernetes())
_BY_NAME = {name: backend for backend in BACKENDS for name in backend.names}


def backend_for(name: str) -> Backend:
    """The backend a record (or a plan) names.

    Raises:
        InvalidInput: a name no backend answers to (a record written by a newer nodewise, say).
    """
    try:
        return _BY_NAME[name]
    except KeyError as e:
        raise InvalidInput(
            f"no backend is named {name!r}; known: {', '.join(sorted(_BY_NAME))} (a record written by another "
            "version of nodewise? deploy the model again)"
        ) from e
