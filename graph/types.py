"""Socket and value types, and the rule for whether an output may feed an input.

Types are plain strings, as on ComfyUI's wire: the widget types INT, FLOAT, STRING, BOOLEAN and COMBO,
and socket types such as MODEL or LATENT. A type may be a comma-separated union ("FLOAT,INT") and "*"
matches anything, so that existing node packs and clients keep working.
"""

from __future__ import annotations

INT = "INT"
FLOAT = "FLOAT"
STRING = "STRING"
BOOLEAN = "BOOLEAN"
COMBO = "COMBO"
ANY = "*"

WIDGET_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})

# The socket types of the built-in nodes; any other upper-case name is accepted too (plugins add their own).
MODEL = "MODEL"
CLIP = "CLIP"
VAE = "VAE"
CONDITIONING = "CONDITIONING"
LATENT = "LATENT"
IMAGE = "IMAGE"
MASK = "MASK"
SAMPLER = "SAMPLER"
SIGMAS = "SIGMAS"
NOISE = "NOISE"
GUIDER = "GUIDER"


def _members(type_name: str) -> set[str]:
    return {part.strip() for part in type_name.split(",") if part.strip()}


def types_compatible(received: str, expected: str) -> bool:
    """True if a value of type `received` may feed an input of type `expected`.

    Identical names match; "*" on either side matches; unions match when they share a member.
    A COMBO input also takes STRING values (a combo's value is a string on the wire).
    """
    if received == expected or ANY in (received, expected):
        return True
    got, want = _members(received), _members(expected)
    if ANY in got or ANY in want or got & want:
        return True
    return COMBO in want and bool(got & {STRING, COMBO})
