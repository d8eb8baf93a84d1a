"""Memory planner: model states agree with DeepSpeed's own estimators, activations behave as they must, the
recommendation fits and its DeepSpeed config loads."""

from __future__ import annotations

import json

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from dapt.cli.load import load_config
from dapt.config.gpus import BY_NAME
from dapt.config.schema import CHOICES
from dapt.tools.plan import (
    Setup,
    activation_bytes,
    estimate,
    estimate_for,
    model_state_bytes,
)
from dapt.tools.plan import (
    run as run_plan,
)

BERT_BASE = (
    "{model_type: bert, hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, "
    "intermediate_size: 3072, max_position_embeddings: 512}"
)


@pytest.mark.parametrize("gpus", [1, 4, 16])
def test_model_states_agree_with_deepspeeds_estimators(gpus):
    params, largest = 110_000_000, 23_000_000
    _, z2 = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=False)
    _, z2_off = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=True)
    _, z3, _ = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=gpus, cpu_offload=False
    )
    _, z3_off, _ = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=gpus, cpu_offload=True, cpu_offload_params=True
    )
    _, z3_opt, _ = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=gpus, cpu_offload=True, cpu_offload_params=False
    )
    assert model_state_bytes(params, largest, 2, "none", gpus, True) == pytest.approx(z2, rel=1e-6)
    assert model_state_bytes(params, largest, 2, "optimizer", gpus, True) == pytest.approx(z2_off, rel=1e-6)
    assert model_state_bytes(params, largest, 3, "none", gpus, True) == pytest.approx(z3, rel=1e-6)
    assert model_state_bytes(params, largest, 3, "optimizer+params", gpus, True) == pytest.approx(
        z3_off, rel=1e-6
    )
    assert model_state_bytes(params, largest, 3, "optimizer", gpus, True) == pytest.approx(z3_opt, rel=1e-6)
    stages = [model_state_bytes(params, largest, s, "none", gpus, True) for s in range(4)]
    assert stages == sorted(stages, reverse=True) if gpus > 1 else stages[0] >= stages[1]


def test_activations_scale_and_shrink_as_they_must():
    f = {"hidden": 768, "layers": 12, "ffn": 3072, "vocab": 30522, "heads": 12}
    base = activation_bytes(f, 512, 8, False, "sdpa", 0.15, True, True)
    assert activation_bytes(f, 512, 16, False, "sdpa", 0.15, True, True) == pytest.approx(2 * base)
    assert activation_bytes(f, 512, 8, True, "sdpa", 0.15, True, True) < base / 3  # checkpointing
    assert activation_bytes(f, 512, 8, False, "eager", 0.15, True, True) > base  # attention scores kept
    assert (
        activation_bytes(f, 512, 8, False, "sdpa", 0.15, False, True) > base
    )  # dense head: logits everywhere
    assert activation_bytes(f, 512, 8, False, "sdpa", 0.15, True, False) > base  # fp32


def test_plan_recommends_a_fitting_setup_and_writes_a_loadable_ds_config(tmp_path):
    assert set(BY_NAME) == set(CHOICES["plan.gpu"])
    ds = tmp_path / "planned.json"
    cfg = load_config(
        [
            "--model.config",
            BERT_BASE,
            "--model.tokenizer_vocab_size=30522",
            "--data.max_seq_length=512",
            "--plan.gpu=RTX-3090",
            f"--plan.write_ds={ds}",
            "--output_dir",
            str(tmp_path / "p"),
        ],
        world_size=1,
        accelerator="cpu",
    )
    result = run_plan(cfg)
    choice = result["recommendation"]
    assert result["model"]["parameters"] == pytest.approx(109.5e6, rel=0.01)  # BERT-base with its MLM head
    assert choice["fits"] and choice["total_gb"] <= 24 * 0.9 and choice["micro_batch"] >= 8
    bigger = [
        e
        for e in result["estimates"]
        if e["stage"] == choice["stage"]
        and e["offload"] == choice["offload"]
        and e["checkpointing"] == choice["checkpointing"]
        and e["micro_batch"] > choice["micro_batch"]
    ]
    assert all(not e["fits"] for e in bigger)  # the largest micro batch that fits was chosen
    written = json.loads(ds.read_text())
    assert written["zero_optimization"]["stage"] == choice["stage"]
    loaded = load_config(
        [
            "--model.config",
            BERT_BASE,
            "--ds",
            str(ds),
            "--train.precision=bf16",
            "--output_dir",
            str(tmp_path / "x"),
            f"--train.micro_batch_size={choice['micro_batch']}",
        ],
        world_size=1,
        accelerator="cuda",
    )  # the config is valid as written, with the recommended micro batch
    assert loaded.ds_config["train_micro_batch_size_per_gpu"] == choice["micro_batch"]
    assert f"--train.micro_batch_size={choice['micro_batch']}" in (tmp_path / "p" / "plan.md").read_text()


def test_a_model_too_big_for_one_small_gpu_moves_to_zero3_offload_or_more_gpus(tmp_path):
    big = (
        "{model_type: bert, hidden_size: 2048, num_hidden_layers: 48, num_attention_heads: 16, "
        "intermediate_size: 8192, max_position_embeddings: 512}"
    )  # about 2.5 B parameters
    facts = None
    for gpus, expect in ((1, lambda c: c["offload"] != "none"), (8, lambda c: c["offload"] == "none")):
        cfg = load_config(
            [
                "--model.config",
                big,
                "--model.tokenizer_vocab_size=30522",
                "--plan.gpu=RTX-3090",
                f"--plan.gpus={gpus}",
                "--output_dir",
                str(tmp_path / f"g{gpus}"),
            ],
            world_size=1,
            accelerator="cpu",
        )
        result = run_plan(cfg)
        facts = result["model"]
        assert result["recommendation"] and expect(result["recommendation"]), result["recommendation"]
    zero0 = estimate(facts, Setup(0, "none", False, 1), 128, 1, True, "sdpa", 0.15, True)
    assert zero0["total_gb"] > 24  # plain data parallel cannot hold it


def test_measured_activations_scale_with_the_batch_and_match_a_real_two_row_forward():
    import torch
    import torch.nn.functional as F
    from transformers import BertConfig, BertForMaskedLM

    from dapt.tools.plan import head_gradient_bytes, measured_activation_bytes

    conf = BertConfig(
        vocab_size=3000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        attention_probs_dropout_prob=0.0,
    )
    one = measured_activation_bytes(conf, 96, 0.15, sparse=False)
    f = {
        "parameters": 1,
        "largest_layer_parameters": 1,
        "hidden": 128,
        "layers": 2,
        "ffn": 512,
        "vocab": 3000,
        "heads": 4,
    }
    planned = estimate(f, Setup(0, "none", False, 2), 96, 1, False, "sdpa", 0.15, False, one)[
        "activations_gb"
    ]
    model = BertForMaskedLM(conf).train()  # a real 2-row step, measured the same way
    ids = torch.randint(5, 3000, (2, 96))
    labels = torch.where(torch.rand(ids.shape) < 0.15, ids, torch.full_like(ids, -100))
    seen = {}
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
        lambda t: t,
    ):
        F.cross_entropy(model(input_ids=ids).logits[labels != -100], labels[labels != -100])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    real = sum(n for k, n in seen.items() if k not in params) / 2**30
    transient = (
        2 * head_gradient_bytes(96, 3000, 0.15, False, False) / 2**30
    )  # at backward's start, not saved
    assert planned - transient == pytest.approx(real, rel=0.1)
    with_ckpt = estimate(f, Setup(0, "none", True, 2), 96, 1, False, "sdpa", 0.15, False, one)[
        "activations_gb"
    ]
    assert with_ckpt < planned


def test_time_estimate_follows_the_flops_the_tokens_and_the_gpus(tmp_path):
    argv = [
        "--model.config",
        BERT_BASE,
        "--model.tokenizer_vocab_size=30522",
        "--data.max_seq_length=512",
        "--plan.gpu=A100-40GB",
        "--plan.tokens=1000000000",
        "--plan.measure=false",
        "--train.epochs=2",
        "--train.max_steps=0",
        "--output_dir",
        str(tmp_path / "p"),
    ]
    one = run_plan(load_config(argv, world_size=1, accelerator="cpu"))["time"]
    eight = run_plan(load_config(argv + ["--plan.gpus=8"], world_size=1, accelerator="cpu"))["time"]
    assert one["train_flops_per_token"] > 6 * 85e6  # at least 6 x the encoder's parameters
    assert one["hours"] == pytest.approx(
        2 * 1e9 * one["train_flops_per_token"] / (312e12 * 0.35) / 3600, rel=1e-3
    )
    assert eight["hours"] == pytest.approx(one["hours"] / 8, rel=1e-3)
    assert "Estimated time" in (tmp_path / "p" / "plan.md").read_text()


def test_tokens_are_counted_from_the_training_files(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcd efgh\n" * 100)  # 900 characters without line ends
    argv = [
        "--model.config",
        BERT_BASE,
        "--data.train",
        str(corpus),
        "--plan.measure=false",
        "--plan.chars_per_token=3",
        "--train.max_steps=0",
        "--output_dir",
        str(tmp_path / "p"),
    ]
    assert run_plan(load_config(argv, world_size=1, accelerator="cpu"))["time"]["tokens_per_epoch"] == 300


def _tiny_modernbert():
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        local_attention=32,
        global_attn_every_n_layers=3,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )


def test_a_long_row_measured_short_and_scaled_matches_the_long_row_measured():
    from transformers import BertConfig

    from dapt.tools.plan import measured_activation_bytes

    conf = (
        _tiny_modernbert()
    )  # sliding-window layers: SDPA keeps a (tokens x tokens) mask, which grows as a square
    long, short = (
        measured_activation_bytes(conf, 512, 0.3, True),
        measured_activation_bytes(conf, 64, 0.3, True),
    )
    assert long.attention > 0.1 * long.linear
    assert short.at(512) == pytest.approx(long.at(512), rel=0.03)
    assert short.at(512, flash=True) == pytest.approx(long.linear, rel=0.03)  # flash attention keeps no mask
    bert = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        attention_probs_dropout_prob=0.0,
    )
    assert measured_activation_bytes(bert, 128, 0.15, True).attention == 0  # unpadded SDPA: nothing square
    eager = measured_activation_bytes(bert, 128, 0.15, True, attention="eager")
    assert eager.implementation == "eager" and eager.attention >= 2 * 4 * 128 * 128 * 4  # the probabilities


def test_the_mlm_head_and_embeddings_are_measured_apart_from_the_layers():
    from dapt.tools.plan import measured_activation_bytes

    conf = _tiny_modernbert()
    sparse, dense = (
        measured_activation_bytes(conf, 128, 0.15, True),
        measured_activation_bytes(conf, 128, 0.15, False),
    )
    assert dense.linear > sparse.linear  # the head's transform runs on every token
    assert dense.head - sparse.head == pytest.approx(dense.linear - sparse.linear, rel=1e-6)
    assert dense.embed == sparse.embed > 0 and sparse.head > 0
    assert sparse.embed + sparse.head < sparse.linear / 2  # most of it is in the 3 layers
    rows = sparse.loss / (
        1000 * 4
    )  # the loss keeps its fp32 log-softmax: one row of the vocabulary per masked token
    assert rows == pytest.approx(round(rows), abs=0.1) and 0.05 * 128 < rows < 0.3 * 128  # and the targets
    assert sparse.loss < sparse.head


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_is_within_15_percent_of_the_peak_measured_in_a_real_step_on_cpu(
    recipe, tmp_path, sparse, checkpointing
):
    """The planner's estimate for the very set-up (ZeRO 0, fp32, this micro batch) against launch/profile.py's
    measured peak of one real DeepSpeed training step (torch's MemTracker on CPU). Attention dropout is 0, as the
    planner assumes: CPU SDPA with dropout keeps the probabilities, which the fused GPU kernels do not."""
    from dapt.runtime.group import setup_logging
    from dapt.tools.profile import run as run_profile

    model = (
        "{model_type: bert, hidden_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
        "intermediate_size: 512, max_position_embeddings: 256, attention_probs_dropout_prob: 0.0}"
    )
    argv = [
        "--recipe",
        str(recipe),
        "--model.config",
        model,
        "--data.max_seq_length=128",
        "--train.micro_batch_size=8",
        "--train.precision=fp32",
        f"--train.sparse_prediction={str(sparse).lower()}",
        f"--model.gradient_checkpointing={str(checkpointing).lower()}",
        "--profile.warmup=1",
        "--profile.steps=1",
    ]
    setup_logging("warning")
    measured = run_profile(
        load_config(argv + ["--output_dir", str(tmp_path / "prof")], world_size=1, accelerator="cpu")
    )
    plan = run_plan(
        load_config(
            argv + ["--output_dir", str(tmp_path / "plan"), "--plan.micro_batches=[8]"],
            world_size=1,
            accelerator="cpu",
        )
    )
    row = estimate_for(plan, checkpointing)
    assert plan["activations"]["measured_tokens"] == 128 and plan["precision"] == "fp32"
    assert "MemTracker" in measured["peak_memory"]["how"]
    assert row["total_gb"] == pytest.approx(measured["peak_memory_gb"], rel=0.15), (
        row,
        measured["peak_memory"],
    )


def test_measure_length_halves_a_row_too_long_and_gives_up_when_nothing_fits(monkeypatch, caplog):
    import psutil

    from dapt.tools.plan import measure_length

    f = {"parameters": 400e6, "hidden": 1024, "layers": 28, "ffn": 2624, "vocab": 50368, "heads": 16}
    free = {"available": 8 * 2**30}
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), free)())
    assert measure_length(f, 512, 0.3, True) == 512
    tokens = measure_length(f, 8192, 0.3, True)
    assert tokens and tokens <= 2048 and 8192 % tokens == 0
    assert measure_length(f, 512, 0.3, True, longest=128) == 128
    free["available"] = 2**30  # not even the weights fit
    with caplog.at_level("INFO", logger="dapt"):
        assert measure_length(f, 8192, 0.3, True) is None
    assert "activation measurement skipped" in caplog.text


def test_a_model_without_sdpa_is_measured_and_planned_with_eager_attention(tmp_path):
    argv = [
        "--model.config",
        "{model_type: canine, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
        "intermediate_size: 128, local_transformer_stride: 32}",
        "--data.max_seq_length=256",
        "--plan.tokens=1000",
        "--output_dir",
        str(tmp_path / "p"),
    ]
    result = run_plan(load_config(argv, world_size=1, accelerator="cpu"))
    assert result["attention"] == "eager" and result["activations"]["measured_attention"] == "eager"
    assert result["activations"]["square_attention_mb_fp32"] > 0 and result["recommendation"]
    assert "measured with eager attention" in (tmp_path / "p" / "plan.md").read_text()
