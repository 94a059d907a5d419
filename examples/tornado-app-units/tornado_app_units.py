"""An example third-party tool for tornado_app: ``convert_units``.

Install it next to the service (``pip install examples/tornado-app-units``),
add ``convert_units`` to ``agent.tools`` and send SIGHUP (or restart): the
next reply of an agent that supports tools can call it.

Arguments: ``{"value": 3.5, "from_unit": "mi", "to_unit": "km"}``; result:
``{"value": 5.633, "unit": "km"}``. Options (``tools.convert_units``):
``precision``, the decimals of the result (default 3).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tornado_app.hookspecs import hookimpl
from tornado_app.tools import Tool, ToolContext, ToolError

# Each unit: its quantity and its size in the quantity's base unit.
UNITS = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01),
    "mi": ("length", 1609.344), "ft": ("length", 0.3048), "in": ("length", 0.0254),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237),
    "oz": ("mass", 0.028349523125),
    "c": ("temperature", None), "f": ("temperature", None), "k": ("temperature", None),
}
Unit = Literal["m", "km", "cm", "mi", "ft", "in", "kg", "g", "lb", "oz", "c", "f", "k"]


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    precision: int = Field(3, ge=0, le=10, description="decimals of the result")


class Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: float = Field(description="the amount to convert")
    from_unit: Unit = Field(description="its unit (c, f and k are degrees)")
    to_unit: Unit = Field(description="the unit wanted")


def _to_kelvin(value: float, unit: str) -> float:
    return {"c": value + 273.15, "f": (value - 32) * 5 / 9 + 273.15, "k": value}[unit]


def _from_kelvin(value: float, unit: str) -> float:
    return {"c": value - 273.15, "f": (value - 273.15) * 9 / 5 + 32, "k": value}[unit]


def convert(value: float, from_unit: str, to_unit: str) -> float:
    (kind, size), (to_kind, to_size) = UNITS[from_unit], UNITS[to_unit]
    if kind != to_kind:
        raise ToolError(f"cannot convert {kind} ({from_unit}) to {to_kind} ({to_unit})")
    if kind == "temperature":
        return _from_kelvin(_to_kelvin(value, from_unit), to_unit)
    return value * size / to_size


class ConvertUnits(Tool):
    description = ("Convert an amount between units of length (m, km, cm, mi, ft, in), mass "
                   "(kg, g, lb, oz) or temperature (c, f, k). Use it instead of converting "
                   "in your head.")
    Arguments = Arguments

    def __init__(self, options: Options):
        self.precision = options.precision

    async def call(self, arguments: Arguments, context: ToolContext) -> dict:
        result = convert(arguments.value, arguments.from_unit, arguments.to_unit)
        return {"value": round(result, self.precision), "unit": arguments.to_unit}


@hookimpl
def register_tools(register):
    register("convert_units", lambda options, settings: ConvertUnits(options), options=Options)
