"""launch/fill_mask.py: masked prediction with a trained MLM, for token models (BERT, RoBERTa, ModernBERT,
DistilBERT) and character models (CANINE, where each placeholder is one masked character), as seed 004's inference
script did. Reads texts from fill.text or, interactively, from standard input; writes nothing."""

from __future__ import annotations

import sys

import torch

from dapt.config.schema import BadInput, RunConfig

OTHER = "<other>"  # CANINE's last head class: every code point at or above char_vocab - 1


def load_model(cfg: RunConfig):
    """The model (eval mode) and tokenizer named by model.name_or_path (an exported final/ or a hub id)."""
    from transformers import AutoModelForMaskedLM

    import dapt.model.canine  # noqa: F401  (CANINE's masked-LM class)
    from dapt.model.build import TRAINED_FOR, pretrained_tokenizer
    from dapt.model.hub import from_config

    m = cfg.model
    if not m.name_or_path:
        raise BadInput(
            "launch/fill_mask.py needs --model.name_or_path (a trained model folder such as "
            "runs/NAME/final, or a hub id)"
        )
    model = from_config(AutoModelForMaskedLM.from_pretrained, m).eval()
    tokenizer = pretrained_tokenizer(m, trained_for=TRAINED_FOR["fill_mask"])
    return model, tokenizer


def encode(text: str, tokenizer, placeholder: str, mask_id: int) -> tuple[list[int], list[int]]:
    """Token ids of `text` with every placeholder replaced by one mask id, and the positions of those."""
    parts = text.split(placeholder)
    ids, masked = [tokenizer.cls_token_id], []
    for i, part in enumerate(parts):
        if part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
        if i < len(parts) - 1:
            masked.append(len(ids))
            ids.append(mask_id)
    return ids + [tokenizer.sep_token_id], masked


def predict(
    model, tokenizer, text: str, placeholder: str, mask_id: int, top_k: int
) -> list[list[tuple[str, float]]]:
    """For each placeholder, in order, the top_k (candidate, probability) pairs."""
    ids, masked = encode(text, tokenizer, placeholder, mask_id)
    if not masked:
        raise BadInput(f"no {placeholder} in {text!r}: mark the positions to predict with it")
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
        ).logits
    probs = logits[0, masked].float().softmax(-1)
    best = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    char_vocab = getattr(model.config, "char_vocab", None)
    return [
        [(_name(int(c), tokenizer, char_vocab), float(p)) for p, c in zip(row_p, row_c)]
        for row_p, row_c in zip(best.values, best.indices)
    ]


def _name(index: int, tokenizer, char_vocab: int | None) -> str:
    if char_vocab:  # a CANINE head class is a code point, bar the shared last one
        return OTHER if index == char_vocab - 1 else chr(index)
    return tokenizer.convert_ids_to_tokens(index)


def mask_id_for(cfg: RunConfig, tokenizer) -> int:
    """The id that stands for a masked position: masking.mask_token_id as in training (seed 004: 57344, U+E000),
    else the tokenizer's mask token."""
    if cfg.masking.mask_token_id is not None:
        return cfg.masking.mask_token_id
    if tokenizer.mask_token_id is None:
        raise BadInput("this tokenizer has no mask token: set --masking.mask_token_id as in training")
    return tokenizer.mask_token_id


def show(text: str, predictions: list[list[tuple[str, float]]]) -> str:
    lines = [text]
    for i, candidates in enumerate(predictions, 1):
        lines.append(f"  [{i}] " + "  ".join(f"{c!r} {p:.3f}" for c, p in candidates))
    return "\n".join(lines)


def run(cfg: RunConfig) -> dict:
    model, tokenizer = load_model(cfg)
    f, mask_id = cfg.fill, mask_id_for(cfg, tokenizer)
    texts = f.text or _stdin_lines(f.placeholder)
    results = {}
    for text in texts:
        try:
            results[text] = predict(model, tokenizer, text, f.placeholder, mask_id, f.top_k)
        except ValueError as e:
            if f.text:
                raise
            print(f"  {e}", flush=True)  # interactive: say so and take the next line
            continue
        print(show(text, results[text]), flush=True)
    return results


def _stdin_lines(placeholder: str):
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(f"text with {placeholder} (an empty line or Ctrl-D ends): ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.rstrip("\n")
