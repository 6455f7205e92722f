"""The MLflow model registry: parse model URIs, resolve them to one pinned version."""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from nodewise.core.errors import InvalidModelURI, ModelNotFound, RegistryUnreachable, UnsupportedModel

if TYPE_CHECKING:
    from mlflow import MlflowClient

_URI = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>[1-9][0-9]*))$")
_URI_HELP = "use models:/NAME@ALIAS (e.g. models:/digits@champion) or models:/NAME/VERSION (e.g. models:/digits/3)"
SERVABLE_FLAVORS = ("pytorch", "python_function")


@dataclass(frozen=True)
class ModelURI:
    """A parsed ``models:/`` URI: a name plus exactly one of alias or version."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> ModelURI:
    """Parse ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    Raises:
        InvalidModelURI: anything else, with the accepted forms in the message.
    """
    match = _URI.match(uri.strip()) if isinstance(uri, str) else None
    if match is None:
        raise InvalidModelURI(f"model URI {uri!r} is not valid: {_URI_HELP}")
    return ModelURI(match["name"], match["alias"], match["version"])


class ResolvedModel(BaseModel):
    """One registered model version, with what serving and profiling need to know of it."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    alias: str | None
    pinned_uri: str
    artifact_uri: str
    run_id: str | None
    flavors: list[str]
    flavor: str
    pytorch_format: str | None = None
    input_dtype: str | None = None
    input_shape: tuple[int, ...] | None = None
    artifact_bytes: int
    task: str | None = Field(default=None, description="A transformers model's pipeline task (text-generation).")
    tags: dict[str, str] = Field(default={}, description="The version's tags.")
    model_tags: dict[str, str] = Field(default={}, description="The registered model's tags.")


def resolve_model(uri: str, client: MlflowClient) -> ResolvedModel:
    """Resolve a model URI to one registered version and read its metadata (not its weights).

    Raises:
        InvalidModelURI, ModelNotFound, RegistryUnreachable, UnsupportedModel.
    """
    ref = parse_model_uri(uri)
    with _registry_errors(client):
        registered, version = _find_version(ref, client)
        artifact_uri = client.get_model_version_download_uri(ref.name, version.version)
        info = _read_mlmodel(artifact_uri)
        size = _artifact_bytes(artifact_uri)
    flavors = sorted(info.flavors)
    flavor = next((f for f in SERVABLE_FLAVORS if f in info.flavors), None)
    if flavor is None:
        raise UnsupportedModel(
            f"{ref} (version {version.version}) has flavours {flavors}; nodewise serves models "
            f"with one of {list(SERVABLE_FLAVORS)}: log it with mlflow.pytorch or mlflow.pyfunc"
        )
    dtype, shape = _tensor_input(info)
    return ResolvedModel(
        name=ref.name,
        version=str(version.version),
        alias=ref.alias,
        pinned_uri=f"models:/{ref.name}/{version.version}",
        artifact_uri=artifact_uri,
        run_id=version.run_id,
        flavors=flavors,
        flavor=flavor,
        pytorch_format=info.flavors.get("pytorch", {}).get("serialization_format") if flavor == "pytorch" else None,
        input_dtype=dtype,
        input_shape=shape,
        artifact_bytes=size,
        task=info.flavors.get("transformers", {}).get("task"),
        tags=dict(version.tags or {}),
        model_tags=dict(registered.tags or {}),
    )


def _find_version(ref: ModelURI, client: MlflowClient) -> tuple[Any, Any]:
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(ref.name)
    except MlflowException as e:
        if _is_missing(e):
            raise ModelNotFound(f"no registered model named {ref.name!r}; {_known_models(client)}") from e
        raise
    if ref.alias is not None:
        aliases = dict(registered.aliases or {})
        if ref.alias not in aliases:
            known = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
            raise ModelNotFound(
                f"model {ref.name!r} has no alias {ref.alias!r} (aliases: {known}); set it with "
                f"MlflowClient().set_registered_model_alias({ref.name!r}, {ref.alias!r}, VERSION)"
            )
        return registered, client.get_model_version_by_alias(ref.name, ref.alias)
    try:
        return registered, client.get_model_version(ref.name, ref.version)
    except MlflowException as e:
        if _is_missing(e):
            found = client.search_model_versions(f"name = '{ref.name}'", max_results=20)
            known = ", ".join(sorted((str(v.version) for v in found), key=int)) or "none"
            raise ModelNotFound(f"model {ref.name!r} has no version {ref.version} (versions: {known})") from e
        raise


def _known_models(client: MlflowClient) -> str:
    names = sorted(m.name for m in client.search_registered_models(max_results=20))
    if not names:
        return "the registry at this tracking URI has no registered models yet"
    return "registered models: " + ", ".join(names)


def _is_missing(error: Exception) -> bool:
    return getattr(error, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


class _registry_errors:
    """Turn connection failures into RegistryUnreachable (context manager)."""

    def __init__(self, client: MlflowClient) -> None:
        self._uri = getattr(client, "_registry_uri", None) or getattr(client, "tracking_uri", "?")

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> bool:
        if error is None or isinstance(error, ModelNotFound | UnsupportedModel):
            return False
        cause = _connection_failure(error)
        if cause is not None:
            why = _first_line(str(cause) or type(cause).__name__)
            raise RegistryUnreachable(
                f"could not reach the MLflow registry at {self._uri} ({why}); "
                "start it or point NODEWISE_MLFLOW__TRACKING_URI at a running one"
            ) from error
        return False


def _connection_failure(error: BaseException) -> BaseException | None:
    """The connection or timeout error behind ``error``, found by type along its chain (MLflow's
    REST client wraps requests' errors in an MlflowException, explicitly or implicitly chained)."""
    import requests

    kinds = (ConnectionError, TimeoutError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line[:200]


def _read_mlmodel(artifact_uri: str) -> Any:
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_uri}/MLmodel", dst_path=tmp)
        return Model.load(path)


def load_input_example(model: ResolvedModel) -> tuple[Any, dict[str, Any] | None]:
    """The model's input example, and the JSON request body MLflow saved for it (if any)."""
    import json

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_uri}/MLmodel", dst_path=tmp)
        info = Model.load(str(Path(tmp) / "MLmodel"))
        if info.saved_input_example_info is None:
            return None, None
        for name in ("input_example.json", "serving_input_example.json"):
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_uri}/{name}", dst_path=tmp)
            except (MlflowException, OSError):
                continue
        try:
            example = info.load_input_example(tmp)
        except (MlflowException, ValueError, TypeError):
            example = None  # an example MLflow cannot parse back: the saved request body still serves
        body_path = Path(tmp) / "serving_input_example.json"
        body = json.loads(body_path.read_text()) if body_path.exists() else None
        return example, body


def tile_example(example: Any, batch: int) -> Any:
    """Repeat an array example's rows up to ``batch`` rows; anything else is returned as is."""
    import numpy as np

    if not isinstance(example, np.ndarray) or example.ndim == 0 or len(example) == 0:
        return example
    return np.concatenate([example] * -(-batch // len(example)))[:batch]


@contextlib.contextmanager
def artifact_file(model: ResolvedModel, relative: str) -> Iterator[str | None]:
    """A local path to one of the model's artifacts, or None if it has no such file.

    Read in place from a local artifact store; otherwise downloaded into a temporary folder
    that is removed on exit (a weights file can be many GB).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    local = _local_path(model.artifact_uri)
    if local is not None:
        path = local / relative
        yield str(path) if path.exists() else None
        return
    with tempfile.TemporaryDirectory(prefix="nw-artifact-") as tmp:
        try:
            found: str | None = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{model.artifact_uri}/{relative}", dst_path=tmp
            )
        except (MlflowException, OSError):
            found = None
        yield found


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri.startswith("/"):
        return Path(uri)
    return None


def _artifact_bytes(artifact_uri: str) -> int:
    import mlflow

    total = 0
    pending = [artifact_uri]
    while pending:
        uri = pending.pop()
        for entry in mlflow.artifacts.list_artifacts(artifact_uri=uri):
            child = f"{artifact_uri}/{entry.path}"
            if entry.is_dir:
                pending.append(child)
            else:
                total += entry.file_size or 0
    return total


def _tensor_input(info: Any) -> tuple[str | None, tuple[int, ...] | None]:
    signature = info.signature
    if signature is None or signature.inputs is None or not signature.inputs.is_tensor_spec():
        return None, None
    specs = signature.inputs.inputs
    if len(specs) != 1:
        return None, None
    return str(specs[0].type), tuple(int(d) for d in specs[0].shape)


def make_client(tracking_uri: str, registry_uri: str) -> MlflowClient:
    """An MLflow client for the given registry."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)


def retry_unreachable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only when the registry did not answer; a missing model will not appear by retrying."""
    try:
        state.result()
    except RegistryUnreachable:
        return True
    except Exception:
        return False
    return False
