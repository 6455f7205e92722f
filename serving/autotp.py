"""What DeepSpeed's AutoTP can shard, in one place: the worker checks a loaded module with it,
the deploy checks a registered config before launching, and placement plans only rank counts
it allows.
"""

from __future__ import annotations

from collections.abc import Mapping

# DeepSpeed 0.19's AutoTP refuses these architectures (a kernel-injection policy exists instead).
AUTOTP_REFUSES = ("deberta", "flaubert", "fsmt", "gpt2", "led", "longformer", "xlm", "xlnet")
AUTOTP_FAMILIES = "Llama, Mistral, Mixtral, Qwen2, Gemma, Phi, Falcon, OPT, BLOOM, GPT-J, GPT-NeoX, MPT, T5, BERT"
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads")


def uneven_heads(tp_size: int, heads: Mapping[str, int | None]) -> str | None:
    """Which head count ``tp_size`` ranks cannot split evenly (``"num_key_value_heads=3, which 2
    ranks cannot split evenly"``), or None when every one divides."""
    for field in HEAD_FIELDS:
        count = heads.get(field)
        if isinstance(count, int) and count and count % tp_size:
            return f"{field}={count}, which {tp_size} ranks cannot split evenly"
    return None


def architecture_refusal(model_type: str | None, tp_size: int, what: str) -> str | None:
    """Why AutoTP cannot shard ``what`` (a model of ``model_type``; None: a custom torch module)
    ``tp_size`` ways whatever its head counts, or None when its architecture is one it shards."""
    if tp_size == 1 or (model_type is not None and model_type not in AUTOTP_REFUSES):
        return None
    return (
        f"DeepSpeed AutoTP cannot shard {what} over {tp_size} ranks: it shards Hugging Face transformer "
        f"models ({AUTOTP_FAMILIES}, ...), not {', '.join(AUTOTP_REFUSES)} nor custom modules"
    )
