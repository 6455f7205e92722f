import pytest
from pydantic import ValidationError

from nodewise.core.settings import Settings


def test_defaults_are_embedded(tmp_path) -> None:
    s = Settings(state_dir=tmp_path)
    assert s.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert s.registry_uri == s.tracking_uri
    assert s.prefect.api_url is None
    assert s.ray.address is None
    assert s.serve.host == "127.0.0.1"


def test_environment_with_nested_delimiter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEWISE_MLFLOW__TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("NODEWISE_RAY__ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv("NODEWISE_SERVE__REPLICAS", "4")
    s = Settings()
    assert s.tracking_uri == "http://mlflow.internal:5000"
    assert s.ray.address == "10.0.0.5:6379"
    assert s.serve.replicas == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mlflow": {"tracking_uri": "ftp://x"}}, r"MLflow URI 'ftp://x' has an unknown scheme; use sqlite"),
        ({"prefect": {"api_url": "localhost:4200"}}, r"must start with http:// or https://"),
        ({"ray": {"address": "10.0.0.5"}}, r"Ray address '10.0.0.5' must be HOST:PORT"),
        ({"ray": {"port": 80}}, r"greater than or equal to 1024"),
        ({"serve": {"port": 70000}}, r"less than or equal to 65535"),
        ({"serve": {"replicas": 0}}, r"greater than 0"),
        ({"serve": {"min_replicas": 6}}, r"max_replicas \(4\) is below min_replicas \(6\); raise max_replicas"),
        ({"serve": {"batch_wait_timeout_s": -1}}, r"greater than or equal to 0"),
        ({"placement": {"headroom_fraction": 1.5}}, r"less than or equal to 1"),
        ({"placement": {"headroom_fraction": 0}}, r"greater than 0"),
        ({"ray": {"port": 7000}, "serve": {"port": 7002}}, r"serve.port \(7002\) collides with ray.port \(7000\)"),
        ({"serve": {"no_such_option": 1}}, r"Extra inputs are not permitted"),
    ],
)
def test_invalid_values_are_rejected_with_a_reason(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


def test_invalid_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEWISE_SERVE__PORT", "abc")
    with pytest.raises(ValidationError, match="valid integer"):
        Settings()


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"NODEWISE_SERVE__PORT": "70000"}, "error: invalid setting serve.port ('70000'): Input should be less than"),
        (
            {"NODEWISE_SERVE__MIN_REPLICAS": "6"},
            "error: invalid settings in serve: max_replicas (4) is below min_replicas (6); raise max_replicas "
            "or lower min_replicas (NODEWISE_SERVE__*)",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path, env: dict[str, str], line: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).with_name("nodewise"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NODEWISE_")}
    done = subprocess.run(
        [cli, "status"], env={**clean, "NODEWISE_STATE_DIR": str(tmp_path), **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().startswith(line), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "image",
    [
        "nodewise:0.1.0",
        "localhost/nodewise:0.1.0",
        "ghcr.io/org/ml/nodewise:1.2-cuda",
        "registry.example.com:5000/ml/nodewise@sha256:" + "ab" * 32,
        "registry.example.com/nodewise:0.1.0@sha256:" + "0" * 64,
    ],
)
def test_an_image_may_be_pinned_by_tag_or_digest(image: str) -> None:
    from nodewise.core.settings import KubernetesSettings

    assert KubernetesSettings(image=image).image == image


@pytest.mark.parametrize("image", ["Nodewise:latest", "nodewise:", "a b", "nodewise@sha256:abc", "-x/nodewise"])
def test_a_malformed_image_is_refused_naming_the_form(image: str) -> None:
    from nodewise.core.settings import KubernetesSettings

    with pytest.raises(ValueError, match=r"is not an image reference; write \[REGISTRY"):
        KubernetesSettings(image=image)


def test_the_default_image_is_the_version_the_build_script_tags() -> None:
    from nodewise import __version__
    from nodewise.core.settings import KubernetesSettings

    assert KubernetesSettings().image == f"nodewise:{__version__}"
