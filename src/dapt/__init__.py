"""dapt: domain-adaptive MLM pretraining and fine-tuning of Hugging Face encoders on DeepSpeed."""

__version__ = "0.1.0"
