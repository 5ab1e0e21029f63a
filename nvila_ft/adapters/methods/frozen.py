"""`frozen`: the component is not trained."""

from __future__ import annotations

from nvila_ft.adapters.methods.base import Method


class Frozen(Method):
    name = "frozen"
    trains = False
