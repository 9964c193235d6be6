"""What a Flower message carries for a round protocol, and its size on the wire.

A protocol's :data:`synthlearn.protocol.Arrays` (named tensor groups) travel as one ``ArrayRecord`` with keys
``<group>::<tensor>`` (Flower chunks arrays; bytes inside a ``ConfigRecord`` are not), its scalars as a
``ConfigRecord`` (server -> site) or a ``MetricRecord`` plus a ``ConfigRecord`` for text (site -> server).
"""

from __future__ import annotations

from typing import Any

from synthlearn.protocol import Arrays, FederationError

#: separates the group name from the tensor name in ArrayRecord keys
KEY_SEP = "::"
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"


def states_to_record(states: Arrays):
    """Named tensor groups -> one ``ArrayRecord`` (keys ``<group>::<tensor>``)."""
    from flwr.app import ArrayRecord

    flat = {f"{name}{KEY_SEP}{k}": v.detach().cpu().contiguous() for name, sd in states.items() for k, v in sd.items()}
    return ArrayRecord(flat)


def record_to_states(record) -> Arrays:
    """Inverse of :func:`states_to_record`.

    Raises:
        FederationError: a key without the ``<group>::<tensor>`` form.
    """
    out: Arrays = {}
    for key, tensor in record.to_torch_state_dict().items():
        name, _, param = key.partition(KEY_SEP)
        if not param:
            raise FederationError(f"unexpected array key {key!r} in a message (expected '<group>::<tensor>')")
        out.setdefault(name, {})[param] = tensor
    return out


def split_scalars(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Numbers (for a ``MetricRecord``) and text (for a ``ConfigRecord``) of a scalar dict."""
    numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    text = {k: str(v) for k, v in values.items() if k not in numbers}
    return numbers, text


def message_nbytes(message) -> int:
    """Bytes of a Flower message as serialized for transport: every object of its tree (message, records, arrays,
    array chunks) deflated, as the Flower object store holds and ships them."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return int(sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values()))


__all__ = ["ARRAYS_KEY", "CONFIG_KEY", "KEY_SEP", "METRICS_KEY", "message_nbytes", "record_to_states",
           "split_scalars", "states_to_record"]
