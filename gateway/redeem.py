"""Redemption codes (兑换码), pure: making one, its one spelling, and the keyed hash that is
all Redis ever keeps of it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

# Crockford's base32: no I, L, O, U, so a code read aloud or typed is not misread
_CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_REDEEM = re.compile(r"[A-Z0-9]{6,64}", re.ASCII)
_FROM_B32 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CODE_ALPHABET)


def new_redemption_code() -> str:
    """16 characters (80 random bits) in groups of four: `7K3M-Q9XD-...`."""
    raw = base64.b32encode(secrets.token_bytes(10)).decode().translate(_FROM_B32)
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


def normalize_code(code: str) -> str | None:
    """A code's one spelling: upper case, dashes and spaces dropped; None if it cannot be a
    code (6-64 ASCII letters and digits)."""
    if not code.isascii():  # before upper(): "ß".upper() is "SS"
        return None
    flat = code.replace("-", "").replace(" ", "").upper()
    return flat if _REDEEM.fullmatch(flat) else None


def code_hash(key: bytes, campaign_id: str, code: str) -> str:
    """What Redis keeps of a redemption code: a keyed HMAC, bound to the campaign, so the
    codes cannot be read back from Redis, its AOF or a backup."""
    flat = normalize_code(code) or code
    return hmac.new(key, f"redeem\x00{campaign_id}\x00{flat}".encode(),
                    hashlib.sha256).hexdigest()[:32]
