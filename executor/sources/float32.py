"""A float32's shortest decimal: the digits PostgreSQL prints for a ``real``.

The MySQL source reads a FLOAT column as the exact double of its float32 (the
text protocol would print only 6 significant digits); ``shortest_float32`` then
gives the double of the shortest decimal that reads back as that float32, which
``orjson`` prints digit for digit.
"""

from __future__ import annotations

import struct
from decimal import Decimal
from fractions import Fraction

_FLOAT32 = struct.Struct("<f")
_UINT32 = struct.Struct("<I")
_PAST_FLOAT32_MAX = 2.0**128  # the neighbour above the largest float32: where strtof overflows


def _float32_at(bits: int) -> float:
    return _FLOAT32.unpack(_UINT32.pack(bits))[0] if bits < 0x7F800000 else _PAST_FLOAT32_MAX


_SIGNIFICANT = {digits: f"%.{digits - 1}e" for digits in range(1, 10)}  # a format per digit count


def _reads_back(text: str, low: float, high: float) -> bool:
    """Whether a decimal lies strictly between the two midpoints around a float32."""
    number = float(text)
    if low < number < high:
        return True
    # float(text) rounded onto a midpoint: decide on the decimal's exact value.
    return number in (low, high) and low < Fraction(text) < high


def shortest_float32(value: float) -> float:
    """The double of the shortest decimal that reads back as ``value``, a float32.

    The same digits as PostgreSQL's ``real`` output (shortest, and of those the nearest;
    a decimal exactly halfway to a neighbour is never chosen), so that
    ``orjson`` prints them: 3.1415927410125732 → 3.1415927, 16777216.0 → 16777216.0.
    """
    if value == 0 or value - value != 0:
        return value
    size = abs(value)
    bits = _UINT32.unpack(_FLOAT32.pack(size))[0]
    low = (size + _float32_at(bits - 1)) / 2
    high = (size + _float32_at(bits + 1)) / 2
    # If the nearest decimal of d significant digits reads back, so does the nearest of
    # d + 1 (it is no farther away): search d in 1..9 (9 always reads back).
    first, last = 1, 9
    while first < last:
        digits = (first + last) // 2
        if _reads_back(_SIGNIFICANT[digits] % size, low, high):
            last = digits
        else:
            first = digits + 1
    best = _SIGNIFICANT[first] % size
    if bits & 0x7FFFFF == 0 and first > 1:
        # A power of two is twice as close to its lower neighbour as to its upper one:
        # one digit fewer may read back just above it while the nearest (below) does not.
        shorter = Decimal(_SIGNIFICANT[first - 1] % size)
        if shorter < Decimal(size):
            above = str(shorter + Decimal((0, (1,), shorter.adjusted() - first + 2)))
            if _reads_back(above, low, high):
                best = above
    number = float(best)
    return number if value > 0 else -number
