"""The config layer (bottom): the run's fields and their docs (schema), the DeepSpeed config, the GPU facts table,
accelerate's config file, secret redaction. Imports nothing else of dapt."""
