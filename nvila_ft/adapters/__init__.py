"""Per-component adapter policies: what trains, how, and with which learning rate."""

from nvila_ft.adapters.apply import apply_policy, format_report, load_for_policy, trainable_report
from nvila_ft.adapters.policy import AdapterPolicy, ComponentPolicy, PolicyError, QuantizationPolicy

__all__ = [
    "AdapterPolicy",
    "ComponentPolicy",
    "PolicyError",
    "QuantizationPolicy",
    "apply_policy",
    "format_report",
    "load_for_policy",
    "trainable_report",
]
