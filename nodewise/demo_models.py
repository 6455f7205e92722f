"""The demo's models, shared by the demo, benchmarks and tests: a small torch MLP trained on
scikit-learn's digits (shipped with scikit-learn), and a small Llama-style LM with random weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

DEMO_MODEL = "nodewise-digits"
DEMO_EXPERIMENT = "nodewise-demo"
DEMO_TAG = "nodewise.demo"


@dataclass(frozen=True)
class DemoModel:
    name: str
    version: str
    accuracy: float
    trained: bool


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 8x8 digits as float32 rows in [0, 1]: train X, train y, test X, test y."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test


def train_digits(epochs: int = 40, seed: int = 0) -> tuple[object, float]:
    """Train a 64-128-64-10 MLP; return the module and its test accuracy."""
    import torch

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_split(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    for _ in range(epochs):
        for idx in torch.randperm(len(xs)).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    return model, accuracy


def _demo_version(client: Any, name: str, alias: str, tag: str) -> Any | None:
    """The version under ``alias`` if the demo registered it (it carries ``tag``), else None."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return current if tag in (current.tags or {}) else None


def _demo_experiment(client: Any, artifact_root: str) -> str:
    """The demo's experiment, created with its artifacts under the state folder."""
    experiment = client.get_experiment_by_name(DEMO_EXPERIMENT)
    if experiment is not None:
        return str(experiment.experiment_id)
    return str(client.create_experiment(DEMO_EXPERIMENT, artifact_location=f"file://{artifact_root}"))


def register_demo_model(
    artifact_root: str, name: str = DEMO_MODEL, alias: str = "champion", retrain: bool = False
) -> DemoModel:
    """Train and register the demo model with a signature and input example; set ``alias``.

    Reuses the version under ``alias`` when it is a demo model already, unless ``retrain``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    client = MlflowClient()
    current = None if retrain else _demo_version(client, name, alias, DEMO_TAG)
    if current is not None:
        return DemoModel(name, str(current.version), float(current.tags[DEMO_TAG]), False)
    experiment_id = _demo_experiment(client, artifact_root)
    model, accuracy = train_digits()
    _, _, x_test, _ = digits_split()
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(x_test[:4])).numpy()  # type: ignore[operator]
    # Explicit requirements: MLflow's inference takes seconds and warns about torch's "+cpu".
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    quiet = logging.getLogger("mlflow.pytorch")
    level, quiet.level = quiet.level, logging.ERROR  # the pickle caution: we chose pickle
    with mlflow.start_run(experiment_id=experiment_id, run_name="digits-mlp"):
        mlflow.log_metric("test_accuracy", accuracy)
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(x_test[:4], logits),
            input_example=x_test[:2],
            serialization_format="pickle",  # pickle: any batch size
            registered_model_name=name,
            pip_requirements=requirements,
        )
    quiet.setLevel(level)
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, DEMO_TAG, f"{accuracy:.4f}")
    client.set_registered_model_alias(name, alias, version)
    return DemoModel(name, version, accuracy, True)


# -- the multi-node demo: a small Llama-style causal LM -----------------------------------------
DEMO_LM = "nodewise-tiny-llama"
DEMO_LM_TAG = "nodewise.demo.lm"
_CHARS = [chr(i) for i in range(32, 127)]
# "user: hi | assistant:" (the character vocabulary has no newline)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} | {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def char_tokenizer() -> object:
    """A character-level tokenizer built in code (printable ASCII; no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(_CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE  # what /v1/chat/completions renders a conversation with
    return tokenizer


def build_llama(
    hidden: int = 256, layers: int = 4, heads: int = 4, max_positions: int = 512, seed: int = 0
) -> tuple[object, object]:
    """A randomly initialised Llama-style causal LM and its tokenizer (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(_CHARS) + 3,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def log_llama(model: object, tokenizer: object, name: str, experiment_id: str | None = None) -> str:
    """Register ``model`` with the transformers flavour (text-generation); returns the version."""
    import mlflow
    import torch
    import transformers

    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
    with mlflow.start_run(experiment_id=experiment_id, run_name=name):
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            input_example=["nodewise serves"],
            registered_model_name=name,
            pip_requirements=requirements,
        )
    return str(info.registered_model_version)


def register_demo_lm(artifact_root: str, name: str = DEMO_LM, alias: str = "champion", retrain: bool = False) -> str:
    """Register the demo LM (reusing the version under ``alias`` unless ``retrain``); returns its version."""
    from mlflow import MlflowClient

    client = MlflowClient()
    current = None if retrain else _demo_version(client, name, alias, DEMO_LM_TAG)
    if current is not None:
        return str(current.version)
    experiment_id = _demo_experiment(client, artifact_root)
    model, tokenizer = build_llama()
    version = log_llama(model, tokenizer, name, experiment_id)
    client.set_model_version_tag(name, version, DEMO_LM_TAG, "random weights")
    client.set_registered_model_alias(name, alias, version)
    return version


def too_small_inventory(
    path: object, one_copy_bytes: int, per_rank_bytes: int, headroom: float, addresses: list[str] | None = None
) -> str:
    """Declare two nodes on this machine, each too small for one copy but big enough for half.

    ``addresses``: the nodes' addresses instead (other hosts; a third one is a spare).

    The demo has one machine; this inventory is how it shows the multi-node path: the plan
    finds no node that holds the model, splits it over both, and mpirun starts one rank per
    "node", all on this host.
    """
    from pathlib import Path

    import yaml

    usable = (one_copy_bytes + per_rank_bytes) // 2  # between half (plus overheads) and one copy
    host_memory = int(usable / headroom)
    nodes = [
        {"name": f"demo-node-{i}", "cpus": 1, "host_memory": host_memory, "address": address}
        for i, address in enumerate(addresses or ["localhost", "localhost"])
    ]
    target = Path(str(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump({"nodes": nodes}, sort_keys=False))
    return str(target)
