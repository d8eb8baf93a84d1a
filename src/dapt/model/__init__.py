"""The model layer: tokenizers, the one model builder (MLM, classifier, encoder), attention choice and flash
attention's packed rows, CANINE, sparse prediction, hub loading. Imports dapt.config and dapt.runtime."""
