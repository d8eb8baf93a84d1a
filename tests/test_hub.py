"""The Hugging Face hub: model.revision (through the hub's own cache layout, offline) and hub.push. No hub can be
reached here, and none is faked: the push is tested up to huggingface_hub's upload call, which meets an endpoint
where nothing listens, and the run must then keep final/, say how to upload it by hand and exit 5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL, launch

from dapt.cli.load import load_config
from dapt.config.schema import ConfigError

TOKEN = "hf_" + "dApTtEsT0123456789" * 2  # the shape of a real token, so that redaction has to catch it


def _hub_snapshots(cache: Path, corpus_file: Path) -> dict[str, int]:
    """A hub model dapt-tests/tiny in the hub cache layout (refs/<revision> -> snapshots/<commit>), with a branch main
    of 2 layers and a tag v1 of 1 layer. Returns the layer count of each revision."""
    from transformers import BertConfig, BertForMaskedLM

    from dapt.model.build import train_wordpiece

    tok = train_wordpiece(corpus_file.read_text().splitlines(), 300, 32)
    repo, layers = cache / "models--dapt-tests--tiny", {"main": 2, "v1": 1}
    for i, (revision, n) in enumerate(layers.items()):
        commit = f"{i + 1}" * 40
        fields = {k: v for k, v in TINY_MODEL.items() if k != "model_type"} | {"num_hidden_layers": n}
        BertForMaskedLM(BertConfig(vocab_size=len(tok), **fields)).save_pretrained(
            repo / "snapshots" / commit
        )
        tok.save_pretrained(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return layers


def test_model_revision_loads_that_revision_of_a_hub_model(tmp_path, corpus_file, monkeypatch):
    """--model.revision=v1 trains the v1 snapshot, not main's; the model card names the revision."""
    layers = _hub_snapshots(tmp_path / "hub", corpus_file)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = [f"--data.train={corpus_file}", "--data.max_seq_length=32", "--train.max_steps=2",
              "--train.eval_every=0", "--log.progress=false", "--model.name_or_path=dapt-tests/tiny"]  # fmt: skip
    for revision in ("v1", None):
        out = tmp_path / f"run-{revision}"
        launch([*common, f"--output_dir={out}", *([f"--model.revision={revision}"] if revision else [])])
        trained = json.loads((out / "final" / "config.json").read_text())
        assert trained["num_hidden_layers"] == layers[revision or "main"]
        card = (out / "final" / "README.md").read_text()
        assert ("at revision `v1`" in card) == (revision == "v1")
    bad = launch([*common, f"--output_dir={tmp_path / 'bad'}", "--model.revision=v9"], check=False)
    assert bad.returncode == 2 and "model.name_or_path 'dapt-tests/tiny' cannot be loaded" in bad.stderr


def test_model_revision_of_a_local_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.revision: 'v1' applies to hub models"):
        load_config([f"--model.name_or_path={tmp_path}", "--model.revision=v1"], world_size=1)


def test_hub_push_config_problems_are_reported_before_anything_starts(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MY_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        load_config(
            ["--hub.push=true", "--hub.model_id=not a repo", "--hub.token_env=MY_HUB_TOKEN"], world_size=1
        )
    problems = "\n".join(e.value.problems)
    assert "hub.model_id: 'not a repo' is not a hub repository id OWNER/NAME" in problems
    assert "there is no hub token: set MY_HUB_TOKEN" in problems and "HF_HUB_OFFLINE is set" in problems
    from dapt.runtime.publish import hub_token

    assert hub_token("MY_HUB_TOKEN") is None
    (tmp_path / "no-token").write_text("hf_" + "S" * 34)  # what `hf auth login` saves
    assert hub_token("MY_HUB_TOKEN") == "hf_" + "S" * 34
    monkeypatch.setenv("MY_HUB_TOKEN", TOKEN)
    assert hub_token("MY_HUB_TOKEN") == TOKEN  # the named variable first: what push_final gives HfApi
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    cfg = load_config(
        ["--hub.push=true", "--hub.model_id=me/x", "--hub.token_env=MY_HUB_TOKEN"], world_size=1
    )
    assert cfg.hub.push and cfg.hub.private  # private unless asked otherwise
    # no push: nothing is asked for
    assert not load_config(["--hub.model_id=me/x"], world_size=1).hub.push


def _closed_port() -> int:
    """A local port where nothing listens: every connection is refused at once."""
    from conftest import free_port

    return free_port()


def test_a_run_with_hub_push_uploads_only_a_verified_final_and_keeps_it_when_the_upload_fails(
    tmp_path, recipe, monkeypatch
):
    """The run trains, exports and verifies final/, writes its model card, then calls huggingface_hub's upload with
    the token; there is no hub behind HF_ENDPOINT, so the run exits 5 naming the repository and the command that
    uploads final/ by hand. The token appears in no log and no file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MY_HUB_TOKEN", TOKEN)
    out = tmp_path / "run"
    args = ["--recipe", recipe, "--output_dir", out, "--hub.push=true", "--hub.model_id=dapt-tests/tiny-dapt",
            "--hub.token_env=MY_HUB_TOKEN", "--log.level=info"]  # fmt: skip
    proc = launch(args, check=False)
    assert proc.returncode == 5, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    verified, uploading = (
        log.index("every weight equal to the fp32 masters"),
        log.index("hub.push: uploading"),
    )
    assert verified < uploading  # never before final/ is verified
    assert "the upload of" in proc.stderr and "dapt-tests/tiny-dapt" in proc.stderr
    assert f"hf upload dapt-tests/tiny-dapt {out / 'final'} . --private" in proc.stderr
    final = out / "final"
    assert {"config.json", "model.safetensors", "README.md", "dapt_config.yaml"} <= {
        p.name for p in final.iterdir()
    }
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hub"]["repo"] == "dapt-tests/tiny-dapt" and summary["hub"]["pushed"] is False
    assert summary["hub"]["error"]  # what the client raised, in one line
    assert yaml.safe_load((final / "dapt_config.yaml").read_text())["hub"]["token_env"] == "MY_HUB_TOKEN"
    assert TOKEN not in log
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert TOKEN.encode() not in path.read_bytes(), path
