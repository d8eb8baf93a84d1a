"""Volatile values: random identifiers that differ in every request (session cookies, session ids, tokens) and so
add surprise to every document without saying anything about it. `data.volatile` names the rules applied; each
matched value is replaced by PLACEHOLDER, and nothing else of the document changes.

The rules run where every format's records are read (data/formats.py), so adapting (launch/mlm.py), embedding and
scoring (launch/anomaly.py) see the same text.
"""

from __future__ import annotations

import re

from dapt.config.schema import CHOICES

PLACEHOLDER = "<id>"

# A value replaced by the cookie and session_id rules: identifier-shaped from delimiter to delimiter (6 or more
# letters, digits, . _ ~ -), so a quote, a space, a % escape or a + in it (an attack, never an id) keeps it as it is.
_ID = r"[A-Za-z0-9._~-]{6,}(?![^;,&#?\s])"
# Names of parameters that carry a session or a token, in a query string, a form body or a path (;jsessionid=...).
_SESSION_NAMES = (
    r"jsessionid|phpsessid|aspsessionid\w*|cfid|cftoken|sid|sessid|sessionid|session_id|session|token|csrf\w*|"
    r"xsrf\w*|auth_token|access_token"
)

RULES = CHOICES["data.volatile"]  # rule name -> what it replaces, in the order applied

_COOKIE_LINE = re.compile(r"(?im)^(cookie:[ \t]*)(.*)$")
_COOKIE_PAIR = re.compile(rf"(?<![^;,\s])([^=;,\s]+=)({_ID})")  # a pair starts after a delimiter: linear time
_SET_COOKIE = re.compile(rf"(?im)^(set-cookie:[ \t]*[^=;,\s]+=)({_ID})")
_SESSION = re.compile(rf"(?i)((?<![\w-])(?:{_SESSION_NAMES})=)({_ID})")
_HEX = re.compile(
    r"(?<![0-9A-Za-z%])(?=[0-9A-Fa-f]*[0-9])(?=[0-9A-Fa-f]*[A-Fa-f])[0-9A-Fa-f]{16,}(?![0-9A-Za-z])"
)
_BASE64 = re.compile(
    r"(?<![A-Za-z0-9+/])(?=[A-Za-z0-9+/]*[A-Z])(?=[A-Za-z0-9+/]*[a-z])(?=[A-Za-z0-9+/]*[0-9])"
    r"[A-Za-z0-9+/]{24,}={0,2}(?![A-Za-z0-9+/=])"
)


def _cookie(text: str) -> str:
    text = _COOKIE_LINE.sub(lambda m: m[1] + _COOKIE_PAIR.sub(lambda p: p[1] + PLACEHOLDER, m[2]), text)
    return _SET_COOKIE.sub(lambda m: m[1] + PLACEHOLDER, text)


_APPLY = {
    "cookie": _cookie,
    "session_id": lambda t: _SESSION.sub(lambda m: m[1] + PLACEHOLDER, t),
    "hex": lambda t: _HEX.sub(PLACEHOLDER, t),
    "base64": lambda t: _BASE64.sub(PLACEHOLDER, t),
}


def normaliser(rules: tuple[str, ...] | list[str]):
    """A function text -> text applying `rules` (keys of RULES) in RULES' order; None when there are none."""
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(
            f"data.volatile: unknown rule(s) {', '.join(unknown)}; the rules are {', '.join(RULES)}"
        )
    steps = [_APPLY[r] for r in RULES if r in rules]
    if not steps:
        return None

    def apply(text: str) -> str:
        for step in steps:
            text = step(text)
        return text

    return apply
