"""A tracking URI's password is never kept: specs (and so deployments.json, Serve's config and
the ranks' spec.json) hold it hidden, and serving processes take the whole URI from their
environment, which nodewise's local Ray and mpirun pass on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodewise.core.settings import Settings
from serving.spec import redact_uri, resolve_uri
from tasks.planning.inventory import Inventory, Node
from tasks.planning.placement import plan_placement
from tasks.planning.profiling import MemoryProfile
from tests.unit.factories import resolved_model

GIB = 1024**3
SECRET_URI = "postgresql://mlflow:s3cret-pw@db.internal:5432/mlflow"


@pytest.mark.parametrize(
    ("uri", "kept"),
    [
        (SECRET_URI, "postgresql://mlflow:***@db.internal:5432/mlflow"),
        ("https://me:tok@mlflow.example.com/path?x=1", "https://me:***@mlflow.example.com/path?x=1"),
        ("https://me@mlflow.example.com", "https://me@mlflow.example.com"),  # no password: as it is
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/state/mlflow.db", "sqlite:////tmp/state/mlflow.db"),
        ("databricks", "databricks"),
    ],
)
def test_a_password_in_a_uri_is_hidden_and_nothing_else_changes(uri: str, kept: str) -> None:
    assert redact_uri(uri) == kept


def test_serving_takes_the_whole_uri_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = redact_uri(SECRET_URI)
    assert resolve_uri("http://127.0.0.1:5000", "MLFLOW_TRACKING_URI") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URI)
    assert resolve_uri(stored, "MLFLOW_TRACKING_URI") == SECRET_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://other:pw@db.internal:5432/mlflow")  # not that server/user
    with pytest.raises(ValueError, match="start the serving processes with MLFLOW_TRACKING_URI set to the whole URI"):
        resolve_uri(stored, "MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match=r"the spec keeps no password for postgresql://mlflow:\*\*\*@db"):
        resolve_uri(stored, "MLFLOW_TRACKING_URI")


def test_no_spec_keeps_the_password(tmp_path: Path) -> None:
    from tasks.mpi.deploy import build_deepspeed_spec
    from tasks.rayserve.apps import build_spec

    settings = Settings(state_dir=tmp_path, mlflow={"tracking_uri": SECRET_URI})
    one_node = Inventory(source="t", nodes=[Node(name="n0", cpus=4, host_memory_bytes=8 * GIB)])
    serve_plan = plan_placement(MemoryProfile(method="analytic", weight_bytes=GIB // 4, attention_heads=4), one_node)
    serve_spec = build_spec(resolved_model(flavor="pytorch", flavors=["pytorch"]), serve_plan, settings)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4}))
    lm = resolved_model(flavors=["python_function", "transformers"], artifact_uri=tmp_path.as_uri(), name="lm")
    nodes = [Node(name=f"n{i}", cpus=2, host_memory_bytes=2 * GIB, address="localhost") for i in (0, 1)]
    ds_plan = plan_placement(
        MemoryProfile(method="analytic", weight_bytes=2 * GIB, attention_heads=4), Inventory(source="t", nodes=nodes)
    )
    ds_spec = build_deepspeed_spec(lm, ds_plan, settings)
    for spec in (serve_spec, ds_spec):
        text = spec.model_dump_json()
        assert "s3cret-pw" not in text
        assert (spec.tracking_uri, spec.registry_uri) == (redact_uri(SECRET_URI),) * 2
