"""Nginx's value syntax read into airgate's: times (`60s`, `5m`), sizes (`50m`) and `listen`
addresses.
"""

from __future__ import annotations

_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800,
               "M": 2592000, "y": 31536000}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def nginx_seconds(value: str) -> float:
    """Nginx time syntax ('60', '60s', '5m', '1m30s', '500ms') in seconds."""
    total, digits, index = 0.0, "", 0
    while index < len(value):
        char = value[index]
        if char.isdigit():
            digits += char
            index += 1
            continue
        unit = "ms" if value.startswith("ms", index) else char
        if not digits or unit not in _TIME_UNITS:
            raise ValueError(f"{value!r} is not an Nginx time (like 60s or 5m)")
        total += int(digits) * _TIME_UNITS[unit]
        digits, index = "", index + len(unit)
    if digits:
        total += int(digits)  # a bare number is seconds
    if not value:
        raise ValueError("empty time value")
    return total


def nginx_bytes(value: str) -> int:
    """Nginx size syntax ('1m', '512k', '10M', '0') in bytes."""
    number, unit = (value[:-1], value[-1].lower()) if value[-1:].isalpha() else (value, "")
    if not number.isdigit() or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not an Nginx size (like 1m or 512k)")
    return int(number) * _SIZE_UNITS[unit]


def listen_address(spec: str) -> str | None:
    """An Nginx `listen` address as airgate's HOST:PORT; None for a unix socket."""
    if spec.startswith("unix:"):
        return None
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return f"[{host}]:{rest.removeprefix(':') or '80'}"
    if spec.isdigit():
        return f"0.0.0.0:{spec}"
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = spec, "80"
    return f"{'0.0.0.0' if host in ('', '*') else host}:{port}"
