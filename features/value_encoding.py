"""Columns of python values as Feast ``Value`` protos, and serialised as the online stores keep them.

``proto_values`` is Feast's conversion, faster for plain scalars. The online stores keep each row's values as
one serialised ``RepeatedValue`` (``repeated Value val = 1``), which is the concatenation of one element per
value: tag ``0x0a``, the length, the ``Value`` bytes. For the value types stream features take (``FAST``:
double, int64, bool, string) this module writes those bytes directly, as protobuf writes them
(``tests/test_online_stores.py`` compares the two); a column of another type, or with a value of another
python type, goes through ``proto_values`` and protobuf.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from feast.protos.feast.types.Value_pb2 import RepeatedValue, Value
from feast.type_map import PYTHON_SCALAR_VALUE_TYPE_TO_PROTO_VALUE, python_values_to_proto_values
from feast.value_type import ValueType

NUMERIC = frozenset({"int64_val", "int32_val", "double_val", "float_val", "bool_val"})
NULL = b"\x0a\x00"  # the element of an empty Value (Feast's null)
_DOUBLE = b"\x0a\x09\x29"  # element tag, length 9, double_val (field 5, 64-bit)
_pack_double = struct.Struct("<d").pack
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# value types whose plain python values convert without Feast's per-value checks: the types allowed
PLAIN = {ValueType.INT32: (int, float), ValueType.INT64: (int, float), ValueType.FLOAT: (int, float),
         ValueType.DOUBLE: (int, float), ValueType.STRING: (str,), ValueType.BOOL: (bool,)}


def proto_values(values: Sequence[Any], vt: ValueType) -> list[Value]:
    """Feast's ``python_values_to_proto_values(values, vt)``, faster for a column of plain python scalars of
    the type (``PLAIN``; None or NaN = null), which it converts with Feast's own conversion function; any
    other column goes through Feast."""
    kinds = PLAIN.get(vt)
    if kinds is None or any(v is not None and type(v) not in kinds for v in values):
        return python_values_to_proto_values(list(values), vt)
    field, func, _types = PYTHON_SCALAR_VALUE_TYPE_TO_PROTO_VALUE[vt]
    null = Value()
    return [null if v is None or v != v else Value(**{field: func(v)}) for v in values]


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of an int64 (a negative one as its 64-bit two's complement)."""
    n &= 2**64 - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _element(value: bytes) -> bytes:
    return b"\x0a" + varint(len(value)) + value


_SMALL_INTS = [_element(b"\x20" + varint(i)) for i in range(1024)]  # counts: the most common int64 values


def _double(values: Sequence[Any]) -> tuple[list[bytes], list[float]]:
    enc = [NULL if v is None or v != v else _DOUBLE + _pack_double(v) for v in values]
    return enc, [math.nan if v is None else float(v) for v in values]


def _int64(values: Sequence[Any]) -> tuple[list[bytes], list[float]]:
    enc, nums = [], []
    for v in values:
        if v is None or v != v:
            enc.append(NULL)
            nums.append(math.nan)
            continue
        n = int(v)
        if not INT64_MIN <= n <= INT64_MAX:
            raise ValueError(f"{v!r} is out of the int64 range")
        enc.append(_SMALL_INTS[n] if 0 <= n < 1024 else _element(b"\x20" + varint(n)))
        nums.append(float(n))
    return enc, nums


def _bool(values: Sequence[Any]) -> tuple[list[bytes], list[float]]:
    enc = [NULL if v is None else (b"\x0a\x02\x38\x01" if v else b"\x0a\x02\x38\x00") for v in values]
    return enc, [math.nan if v is None else float(v) for v in values]


def _string(values: Sequence[Any]) -> tuple[list[bytes], list[float]]:
    enc = []
    for v in values:
        if v is None:
            enc.append(NULL)
            continue
        b = v.encode()
        enc.append(_element(b"\x12" + varint(len(b)) + b))
    return enc, [math.nan] * len(values)


# value type → (python types taken as they are, encoder)
FAST: dict[ValueType, tuple[tuple[type, ...], Callable[[Sequence[Any]], tuple[list[bytes], list[float]]]]] = {
    ValueType.DOUBLE: ((int, float), _double),
    ValueType.INT64: ((int, float), _int64),
    ValueType.BOOL: ((bool,), _bool),
    ValueType.STRING: ((str,), _string),
}


def proto_numbers(vals: Sequence[Value]) -> list[float]:
    """The numbers of Values (NaN where a value is not a number; booleans as 0/1)."""
    return [float(getattr(v, k)) if (k := v.WhichOneof("val")) in NUMERIC else math.nan for v in vals]


def encode_column(values: Sequence[Any], vt: ValueType) -> tuple[list[bytes], list[float]]:
    """Each value's ``RepeatedValue`` element and its number (NaN where none)."""
    fast = FAST.get(vt)
    if fast is not None and all(v is None or type(v) in fast[0] for v in values):
        return fast[1](values)
    vals = proto_values(values, vt)
    return [_element(v.SerializeToString()) for v in vals], proto_numbers(vals)


def encode_values(vals: Sequence[Value]) -> tuple[bytes, bytes]:
    """Values as a serialised ``RepeatedValue`` and their numbers as little-endian float64 (NaN: not a number)."""
    nums = proto_numbers(vals)
    return RepeatedValue(val=vals).SerializeToString(), struct.pack(f"<{len(nums)}d", *nums)


def encode_rows(columns: list[list[Any]], types: list[ValueType], n: int) -> list[tuple[bytes, bytes]]:
    """``encode_values`` of each row of value columns (``n`` rows), encoded a column at a time."""
    if not columns:
        return [(b"", b"")] * n
    cols = [encode_column(values, vt) for values, vt in zip(columns, types, strict=True)]
    blob, width = np.array([nums for _enc, nums in cols], dtype="<f8").T.tobytes(), 8 * len(cols)
    return [(b"".join(elements), blob[i * width:(i + 1) * width])
            for i, elements in enumerate(zip(*(enc for enc, _nums in cols), strict=True))]
