"""A tiny Llama registered and deployed on two DeepSpeed ranks, for the multi-node test modules."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from nodewise.core.settings import Settings


def register_tiny_llama(settings: Settings, experiment_name: str, seed: int = 0, name: str = "tiny-llama") -> str:
    """Register a tiny Llama (transformers flavour) with its artifacts in the state folder."""
    from mlflow import MlflowClient

    from nodewise.demo_models import build_llama, log_llama

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment_name)
    experiment = (
        found.experiment_id
        if found
        else client.create_experiment(experiment_name, artifact_location=settings.state.artifacts.as_uri())
    )
    model, tokenizer = build_llama(hidden=64, layers=2, heads=4, max_positions=128, seed=seed)
    return f"models:/{name}/{log_llama(model, tokenizer, name, experiment)}"


def deploy_on_two_ranks(settings: Settings, model_uri: str) -> object:
    """Deploy through the flow on a declared inventory of two local nodes, each too small for one copy."""
    from mlflow import MlflowClient

    from nodewise.demo_models import too_small_inventory
    from tasks.planning.profile_models import profile_with_cache
    from tasks.planning.registry import resolve_model
    from testkit.flows import deploy_model

    model = resolve_model(model_uri, MlflowClient())
    profile = profile_with_cache(model, batch_size=settings.serve.max_batch_size, device="cpu")
    inventory = too_small_inventory(
        settings.state_path / "nodes.yaml", profile.total_bytes, profile.per_rank_bytes(2), 0.9
    )
    return deploy_model(model_uri, inventory=inventory, settings=settings)


def rank_pids(endpoint: str) -> list[int]:
    """The ranks' pids, from rank 0's /health (which must say ready)."""
    health = httpx.get(f"{endpoint}/health", timeout=5).json()
    assert health["ready"], health
    return [r["pid"] for r in health["ranks"]]


def load_whole_llama(model_uri: str) -> tuple[object, object]:
    """The registered LM whole, in this process: its module and tokenizer (what a replica must match)."""
    import mlflow

    components = mlflow.transformers.load_model(model_uri, return_type="components")
    return components["model"].eval(), components["tokenizer"]


def whole_stream(new_tokens: int) -> Callable[[httpx.Response], str | None]:
    """A ``LoadClient`` check: a streamed ``/generate`` answer ran to its end (``new_tokens``, then [DONE])."""

    def check(response: httpx.Response) -> str | None:
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        if not lines or lines[-1] != "data: [DONE]":
            return f"stream cut short after {len(lines)} events"
        usage = [json.loads(line[6:]).get("usage") for line in lines[:-1]]
        done = [u for u in usage if u]
        if not done or done[-1].get("completion_tokens") != new_tokens:
            return f"stream ended with usage {done[-1:] or 'missing'}, {new_tokens} tokens wanted"
        return None

    return check
