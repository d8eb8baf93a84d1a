"""final/README.md: a Hugging Face model card (YAML metadata, then what was trained on what, with which settings,
for how many tokens, and the evaluation results), written for MLM and classifier runs like run_mlm.py writes one."""

from __future__ import annotations

from pathlib import Path

from dapt.config.redact import redact
from dapt.config.schema import RunConfig, save_resolved

PIPELINES = {"mlm": "fill-mask", "classify": "text-classification"}
TEXT_FILE = "dapt_text.json"  # in final/: how the model's training records became text


def hub_datasets(sources: list[str]) -> list[str]:
    """OWNER/NAME of the Hugging Face datasets among data sources (hf://datasets/OWNER/NAME/...)."""
    out = []
    for source in sources:
        if source.startswith("hf://datasets/"):
            parts = source.removeprefix("hf://datasets/").split("/")
            if len(parts) >= 2:
                out.append("/".join(parts[:2]).split("@")[0])
    return list(dict.fromkeys(out))


def usage(task: str, text: str, folder: str = "FOLDER", settings: dict | None = None) -> list[str]:
    """The card's "How to use" section: dapt predict, and transformers' pipeline fed the text as training made it."""
    lines = [
        "## How to use",
        "",
        f"The model read {text}." if text else "",
        "",
        "With dapt (the same text from records of any format it reads, in batches; the label column, when the files "
        "have it, gives the metrics training reports):",
        "",
        "```",
        "dapt predict --model.name_or_path=FOLDER --data.test=new_records.csv --output_dir=runs/predict",
        "```",
        "",
    ]
    if task == "classify":
        settings = settings or {}
        columns = settings.get("columns_in_order") or []
        shown = ", ".join(f'("{name}", row["{name}"])' for name in columns[:3]) + (
            ", ..." if len(columns) > 3 else ""
        )
        options = "".join(
            [
                f", {settings['round_digits']}" if settings.get("round_digits") is not None else "",
                ", omit_zeros=True" if settings.get("omit_zeros") else "",
            ]
        )
        call = f"record_text([{shown}]{options})" if len(columns) > 1 else "text"
        cut = settings.get("max_seq_length")
        lines += [
            "With transformers, feed the text as training made it"
            + (
                " (`dapt.data.formats.record_text` for several columns, in this order)"
                if len(columns) > 1
                else ""
            )
            + (f", cut as training cut it, at {cut} tokens:" if cut else ":"),
            "",
            "```python",
            "from transformers import pipeline",
            *(["from dapt.data.formats import record_text"] if len(columns) > 1 else []),
            'classify = pipeline("text-classification", model="FOLDER", top_k=None)',
            f"classify({call}{f', truncation=True, max_length={cut}' if cut else ''})",
            "```",
        ]
    else:
        lines += [
            "With transformers:",
            "",
            "```python",
            "from transformers import pipeline",
            'fill = pipeline("fill-mask", model="FOLDER")',
            'fill(f"GET /index.html?id={fill.tokenizer.mask_token} HTTP/1.1")',
            "```",
        ]
    return [line.replace("FOLDER", folder) for line in lines]


def saved_tokenizer_marks(folder: Path) -> bool:
    """Whether the tokenizer saved in `folder` marks capitals (model.mark_capitals, or inherited from its base)."""
    from tokenizers import Tokenizer

    from dapt.config.schema import normalizer_marks

    path = folder / "tokenizer.json"
    return normalizer_marks(Tokenizer.from_file(str(path)).normalizer if path.exists() else None)


def write_model_card(
    folder: Path,
    cfg: RunConfig,
    task: str,
    summary: dict,
    *,
    results: dict[str, float],
    text: str = "",
    settings: dict | None = None,
) -> Path:
    """Write folder/README.md; `results` are the evaluation figures to table (name -> value); `text` says how the
    training records became text (dapt.data.prepare.text_description), for the usage section."""
    from huggingface_hub import ModelCard, ModelCardData

    m, d, t = cfg.model, cfg.data, cfg.train
    base = m.name_or_path or None
    data = ModelCardData(
        base_model=base if base and not Path(base).exists() else None,  # a hub id, not a local folder
        library_name="transformers",
        pipeline_tag=PIPELINES[task],
        tags=["dapt", "domain-adaptation" if task == "mlm" else "classification"],
        datasets=hub_datasets([*d.train, *d.valid, *d.test]) or None,
    )
    what = (
        "masked-language-model training (domain-adaptive pretraining)"
        if task == "mlm"
        else "classifier fine-tuning"
    )
    kind = m.config.get("model_type") if isinstance(m.config, dict) else m.config
    start = f"`{base}`" if base else f"a {kind} model built from scratch"
    if base and m.revision:
        start += f" at revision `{m.revision}`"
    ds = cfg.ds_config
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in results.items() if value is not None)
    lines = [
        f"---\n{data.to_yaml()}\n---",
        "",
        f"# {Path(cfg.output_dir).name}",
        "",
        f"{what.capitalize()} with dapt, from {start}.",
        "",
        "## Training",
        "",
        f"- data: {', '.join(f'`{s}`' for s in redact(list(d.train))) or 'the embedded default corpus'} "
        f"({d.format}, rows of {d.max_seq_length} tokens"
        + (f", {d.packing} packing)" if task == "mlm" else ")"),
        f"- {summary.get('steps')} optimizer steps, global batch {ds.get('train_batch_size')} rows "
        f"({t.micro_batch_size} x {t.grad_accum} x {summary.get('world_size', 1)} ranks), lr {t.lr:g} "
        f"({t.lr_schedule}), precision {t.precision}, ZeRO stage {ds.get('zero_optimization', {}).get('stage', 0)}",
        *(
            [
                "- tokenizer: reads each ASCII capital as `^` and its letter (`idA=` as `id ^ a =`; model.mark_capitals), "
                "in its own normalizer: load it with AutoTokenizer (transformers 5) and the marks come with it"
            ]
            if saved_tokenizer_marks(folder)
            else []
        ),
        f"- tokens seen: {summary['tokens_seen']}"
        if summary.get("tokens_seen")
        else f"- rows trained: {summary.get('rows_trained')}",
        f"- these weights: {summary.get('final_checkpoint')} ({summary.get('final_from')})",
        "",
        "## Evaluation",
        "",
        "| metric | value |\n|---|---|\n" + rows if rows else "No evaluation set.",
        "",
        *usage(task, text, str(folder), settings),
        "",
        "The full configuration is in `dapt_config.yaml` in this folder.",
    ]
    save_resolved(cfg, folder / "dapt_config.yaml")
    card = ModelCard("\n".join(lines) + "\n")
    path = folder / "README.md"
    card.save(path)
    return path
