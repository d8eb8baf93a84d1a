"""The embedded default corpus: security-flavoured text that dapt generates itself (no download, no ../shared).

Templated HTTP requests and threat-report sentences have enough regular structure that a tiny encoder's MLM
loss falls visibly within a few hundred steps on a CPU.
"""

from __future__ import annotations

import random
from pathlib import Path

ACTORS = [
    "the attacker",
    "an insider",
    "a botnet",
    "the malware",
    "a phishing kit",
    "the threat group",
    "a scanner",
    "the worm",
    "a ransomware operator",
    "the crawler",
]
ACTIONS = ["used", "abused", "exploited", "scanned", "targeted", "compromised", "enumerated", "probed"]
OBJECTS = [
    "a SQL injection",
    "the login form",
    "an exposed admin panel",
    "a vulnerable plugin",
    "stolen credentials",
    "a path traversal bug",
    "the file upload endpoint",
    "a weak password",
    "an unpatched server",
    "the remote desktop service",
]
GOALS = [
    "to steal session cookies",
    "to gain a foothold",
    "to move laterally",
    "to exfiltrate data",
    "to escalate privileges",
    "to deploy a web shell",
    "to encrypt files",
    "to harvest emails",
]
TARGETS = [
    "on the payment server",
    "in the customer portal",
    "on the build machine",
    "in the mail gateway",
    "on the domain controller",
    "in the cloud bucket",
    "on the VPN appliance",
    "in the HR database",
]
METHODS = ["GET", "GET", "GET", "POST", "PUT", "DELETE"]
PATHS = [
    "/index.php",
    "/login",
    "/api/v1/users",
    "/api/v1/orders",
    "/admin/config",
    "/search",
    "/cart/add",
    "/static/app.js",
    "/account/settings",
    "/upload",
    "/download",
    "/api/v2/items",
]
PARAMS = ["id", "user", "q", "page", "sort", "token", "lang", "item", "file", "ref"]
VALUES = [
    "1",
    "42",
    "admin",
    "guest",
    "en",
    "price",
    "desc",
    "report.pdf",
    "' OR '1'='1",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "home",
    "7",
    "true",
]
AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0)",
    "Mozilla/5.0 (X11; Linux x86_64)",
    "curl/8.4.0",
    "python-requests/2.31",
    "sqlmap/1.7",
    "Googlebot/2.1",
]
HOSTS = ["shop.example.com", "portal.example.org", "api.example.net", "intranet.example.local"]


def http_request(rng: random.Random) -> str:
    path = rng.choice(PATHS)
    query = "&".join(f"{rng.choice(PARAMS)}={rng.choice(VALUES)}" for _ in range(rng.randint(0, 3)))
    target = f"{path}?{query}" if query else path
    return (
        f"{rng.choice(METHODS)} {target} HTTP/1.1 Host: {rng.choice(HOSTS)} "
        f"User-Agent: {rng.choice(AGENTS)} Accept: */*"
    )


def report_sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(ACTORS).capitalize()} {rng.choice(ACTIONS)} {rng.choice(OBJECTS)} "
        f"{rng.choice(GOALS)} {rng.choice(TARGETS)}."
    )


def generate(n_docs: int = 4000, seed: int = 0) -> list[str]:
    """`n_docs` documents, one per line: alternately a raw HTTP request and a two-to-four sentence report."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        if i % 2:
            docs.append(http_request(rng))
        else:
            docs.append(" ".join(report_sentence(rng) for _ in range(rng.randint(2, 4))))
    return docs


def write_default_corpus(path: Path, n_docs: int = 4000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(generate(n_docs, seed)) + "\n")
    return path


# The embedded default run: a tiny BERT trained from scratch on the generated corpus.
DEFAULT_OVERRIDES = {
    "model.config": {
        "model_type": "bert",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
    },
    "model.tokenizer_vocab_size": 1000,
    "data.max_seq_length": 64,
    "train.max_steps": 300,
    "train.micro_batch_size": 16,
    "train.lr": 1e-3,
    "train.eval_every": 100,
    "train.log_every": 20,
    "checkpoint.every": 100,
}
