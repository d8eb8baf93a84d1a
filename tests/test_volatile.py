"""data.volatile: random identifiers replaced by <id> as documents are read, the rest of each document unchanged."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import ROOT, shared_slice

from dapt.cli.load import load_config
from dapt.config.schema import ConfigError
from dapt.data.formats import READERS, FormatOptions
from dapt.data.sources import Position
from dapt.data.volatile import PLACEHOLDER, normaliser

CSIC = ROOT.parent / "shared" / "data" / "csic2010"
HTTP_RULES = ("cookie", "session_id")  # the HTTP recipes' rules (hex matched 72 CSIC attacks' card numbers)


def replaced(original: str, normalised: str) -> list[str]:
    """The spans of `original` that became PLACEHOLDER, asserting that everything else is byte-identical."""
    pieces = normalised.split(PLACEHOLDER)
    pattern = "(.+?)".join(re.escape(p) for p in pieces)
    m = re.fullmatch(pattern, original, re.DOTALL)
    assert m, f"outside the replaced values the text changed:\n{original!r}\n{normalised!r}"
    return list(m.groups())


def test_each_rule_replaces_only_its_values():
    text = (
        "GET /shop/cart.jsp;jsessionid=9F3A2B?item=7&sid=abc HTTP/1.1\n"
        "Cookie: JSESSIONID=B92A8B48B9008CD29F622A994E0F650D; theme=dark\n"
        "Set-Cookie: s=Zx81kq2P; Path=/\n\n"
        "key=dGhpcyBpcyBhIHRlc3Qgb2YgYmFzZTY0IQ==&h=0123456789abcdef0&card=1234567812345678&name=Jam%F3n+Ib%E9rico"
    )
    cases = {
        ("cookie",): ["B92A8B48B9008CD29F622A994E0F650D", "Zx81kq2P"],  # theme=dark: too short for an id
        ("session_id",): ["9F3A2B", "B92A8B48B9008CD29F622A994E0F650D"],  # sid=abc: too short
        ("hex",): ["B92A8B48B9008CD29F622A994E0F650D", "0123456789abcdef0"],
        ("base64",): ["dGhpcyBpcyBhIHRlc3Qgb2YgYmFzZTY0IQ=="],
    }
    for rules, values in cases.items():
        out = normaliser(rules)(text)
        assert replaced(text, out) == values, rules
        assert "card=1234567812345678" in out and "name=Jam%F3n+Ib%E9rico" in out  # digits and words stay
    attacks = (
        "GET /a?sid=1'+OR+'1'='1&token=%3Cscript%3Ealert(1)%3C/script%3E HTTP/1.1\n"
        "Cookie: JSESSIONID=' OR 1=1--; lang=en_US+OR+1=1"
    )
    assert normaliser(["cookie", "session_id"])(attacks) == attacks  # attacks in ids and cookies stay visible
    assert normaliser([]) is None
    with pytest.raises(ValueError, match="unknown rule.*cookie, session_id, hex, base64"):
        normaliser(["cookies"])


@pytest.mark.skipif(not CSIC.is_dir(), reason="../shared/data/csic2010 is absent")
def test_csic_requests_lose_only_their_session_cookies(tmp_path):
    """On real CSIC requests, normal and attacks, read through the http reader with the HTTP recipes' rules: every
    session cookie value is gone, nothing else of any request changed (attack payloads included)."""
    for name in ("normalTrafficTraining", "anomalousTrafficTest"):
        path = shared_slice(CSIC / f"{name}.txt.gz", tmp_path / f"{name}.txt", 4000)
        plain = list(READERS["http"](str(path), Position(), FormatOptions()))
        volatile = list(READERS["http"](str(path), Position(), FormatOptions(volatile=HTTP_RULES)))
        assert len(plain) == len(volatile) > 200
        cookies = 0
        for (a, pa), (b, pb) in zip(plain, volatile, strict=True):
            assert pa == pb and a.id == b.id  # positions (and so resumes) are unchanged
            values = replaced(a.text, b.text)
            sessions = re.findall(r"^Cookie: JSESSIONID=(\w+)$", a.text, re.M)
            assert values == sessions and len(sessions) <= 1
            cookies += len(sessions)
        assert cookies > 0.9 * len(plain)  # CSIC: nearly every request carries a JSESSIONID


def test_config_checks_the_rules_and_recipes_turn_them_on():
    with pytest.raises(
        ConfigError, match=r"data.volatile: 'cookies' is not one of cookie, session_id, hex, base64"
    ):
        load_config(["--data.volatile=[cookie, cookies]"])
    for recipe in ("secbert_http_mlm", "http_anomaly", "smoke/secbert_http_mlm", "smoke/http_anomaly"):
        data = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())["data"]
        assert data["volatile"] == list(HTTP_RULES), recipe
