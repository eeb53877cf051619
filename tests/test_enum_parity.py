"""Every integer enum of the server equals its proto enum, name for name and number for number.

Conversion between records and messages is ``int(...)`` (docs/ARCHITECTURE.md), which is only
right while the numbers agree. Enums are found by walking the server's modules, so a new one is
checked without being listed here.
"""

from __future__ import annotations

import enum
import importlib
import pkgutil
import re

import pytest
from google.protobuf.descriptor import EnumDescriptor

import kfeed.v1
import kfeed_server


def _server_int_enums() -> dict[str, type[enum.IntEnum]]:
    found: dict[str, type[enum.IntEnum]] = {}
    for module_info in pkgutil.walk_packages(kfeed_server.__path__, "kfeed_server."):
        if ".migrations" in module_info.name:
            continue
        module = importlib.import_module(module_info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, enum.IntEnum)
                and value.__module__ == module.__name__
            ):
                found[value.__name__] = value
    return found


def _proto_enums() -> dict[str, EnumDescriptor]:
    enums: dict[str, EnumDescriptor] = {}
    for module_info in pkgutil.iter_modules(kfeed.v1.__path__, "kfeed.v1."):
        if module_info.name.endswith("_pb2"):
            descriptor = importlib.import_module(module_info.name).DESCRIPTOR
            enums.update(descriptor.enum_types_by_name)
    return enums


SERVER_ENUMS = _server_int_enums()


def test_the_walk_finds_the_enums_of_the_records() -> None:
    assert {"DataSource", "MarketStatus", "MarketResult", "Side", "BacktestState"} <= set(
        SERVER_ENUMS
    )


def _proto_name(enum_class: type[enum.IntEnum]) -> str:
    """The proto enum's name: the class's own, unless its docstring starts by naming another
    (``kfeed.v1.OrderBookCheckpointKind: …``)."""
    named = re.match(r"kfeed\.v1\.(\w+)", enum_class.__doc__ or "")
    return named[1] if named else enum_class.__name__


@pytest.mark.parametrize("name", sorted(SERVER_ENUMS))
def test_enum_matches_the_proto(name: str) -> None:
    proto_name = _proto_name(SERVER_ENUMS[name])
    proto = _proto_enums().get(proto_name)
    assert proto is not None, (
        f"{name}: no proto enum {proto_name} in kfeed.v1 (when the names differ, start the"
        " docstring with kfeed.v1.<Enum>)"
    )
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", proto_name).upper() + "_"
    expected = {value.name.removeprefix(prefix): value.number for value in proto.values}
    actual = {member.name: member.value for member in SERVER_ENUMS[name]}
    assert actual == expected
