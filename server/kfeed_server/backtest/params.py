"""Typed strategy parameters: the schema a strategy declares and the validation of given values.

A parameter value is a plain Python value: ``int`` for INTEGER and DOLLARS (DOLLARS in 1/10,000
USD), ``float`` for NUMBER, ``bool`` for BOOLEAN and ``str`` for STRING. The transport maps the
proto ``ParameterValue`` oneof onto these.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from kfeed_server.records.backtest import ParamValue


class ConfigError(ValueError):
    """A backtest configuration is invalid. ``field`` names the offending field the way the proto
    spells it (``strategy``, ``parameters.buy_below``, ``tickers``, ...), so the service can answer
    INVALID_ARGUMENT with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ParameterType(enum.IntEnum):
    """The type of a strategy parameter; values equal the proto ``ParameterType`` numbers."""

    UNSPECIFIED = 0
    INTEGER = 1
    NUMBER = 2
    DOLLARS = 3
    BOOLEAN = 4
    STRING = 5


@dataclass(frozen=True, slots=True)
class ParameterSpec:
    """The schema of one strategy parameter, as ListStrategies exposes it.

    ``default`` None means the parameter is required. ``minimum``/``maximum`` are inclusive bounds
    for the numeric types (INTEGER, NUMBER, DOLLARS), None when unbounded.
    """

    name: str
    type: ParameterType
    description: str
    default: ParamValue | None = None
    minimum: int | float | None = None
    maximum: int | float | None = None

    def coerce(self, value: object, field: str) -> ParamValue:
        """Returns ``value`` checked against this spec (an int is accepted for NUMBER and becomes
        a float); raises ConfigError naming ``field`` when it has the wrong type or is out of
        range."""
        checked: ParamValue
        if self.type in (ParameterType.INTEGER, ParameterType.DOLLARS):
            # bool is an int subclass: True must not pass as the integer 1.
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(field, f"expected {self.type.name.lower()}, got {value!r}")
            checked = value
        elif self.type is ParameterType.NUMBER:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(field, f"expected number, got {value!r}")
            checked = float(value)
            if not math.isfinite(checked):
                raise ConfigError(field, f"expected a finite number, got {value!r}")
        elif self.type is ParameterType.BOOLEAN:
            if not isinstance(value, bool):
                raise ConfigError(field, f"expected boolean, got {value!r}")
            return value
        elif self.type is ParameterType.STRING:
            if not isinstance(value, str):
                raise ConfigError(field, f"expected string, got {value!r}")
            return value
        else:
            raise ConfigError(field, f"parameter type {self.type.name} is not usable")
        if self.minimum is not None and checked < self.minimum:
            raise ConfigError(field, f"{checked!r} is below the minimum {self.minimum!r}")
        if self.maximum is not None and checked > self.maximum:
            raise ConfigError(field, f"{checked!r} is above the maximum {self.maximum!r}")
        return checked


def resolve_parameters(
    specs: tuple[ParameterSpec, ...], given: Mapping[str, object]
) -> dict[str, ParamValue]:
    """Checks ``given`` against ``specs`` and fills in defaults. Raises ConfigError naming
    ``parameters.<name>`` for an unknown, missing, mistyped or out-of-range parameter. The result
    is ordered like ``specs`` so that equal configurations compare and serialise equally."""
    by_name = {spec.name: spec for spec in specs}
    for name in sorted(given):
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise ConfigError(f"parameters.{name}", f"unknown parameter (known: {known})")
    resolved: dict[str, ParamValue] = {}
    for spec in specs:
        field = f"parameters.{spec.name}"
        if spec.name in given:
            resolved[spec.name] = spec.coerce(given[spec.name], field)
        elif spec.default is not None:
            resolved[spec.name] = spec.coerce(spec.default, field)
        else:
            raise ConfigError(field, "required parameter is missing")
    return resolved


class Parameters:
    """Validated parameter values with typed accessors, handed to a strategy's constructor."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, ParamValue]) -> None:
        self._values = dict(values)

    def integer(self, name: str) -> int:
        """An INTEGER or DOLLARS parameter."""
        value = self._values[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"parameter {name} is not an integer: {value!r}")
        return value

    def dollars(self, name: str) -> int:
        """A DOLLARS parameter, in 1/10,000 USD."""
        return self.integer(name)

    def number(self, name: str) -> float:
        """A NUMBER parameter."""
        value = self._values[name]
        if not isinstance(value, float):
            raise TypeError(f"parameter {name} is not a number: {value!r}")
        return value

    def boolean(self, name: str) -> bool:
        """A BOOLEAN parameter."""
        value = self._values[name]
        if not isinstance(value, bool):
            raise TypeError(f"parameter {name} is not a boolean: {value!r}")
        return value

    def string(self, name: str) -> str:
        """A STRING parameter."""
        value = self._values[name]
        if not isinstance(value, str):
            raise TypeError(f"parameter {name} is not a string: {value!r}")
        return value

    def as_dict(self) -> dict[str, ParamValue]:
        """A copy of all values by name."""
        return dict(self._values)
