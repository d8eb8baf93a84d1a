"""The CUDA-only branches, run on CPU through the same code (issue "Run where users run", items 1-9): what export
compares lives on the CPU and is the fp32 masters in every optimizer layout; parameter counts under ZeRO-3."""

from __future__ import annotations

import pytest
import torch
from conftest import DS, run_inprocess
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM

from dapt.checkpoint import masters, safe_load, verify_export
from dapt.dist import init


def _tiny_bf16_bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return BertForMaskedLM(config).to(torch.bfloat16)


@pytest.mark.parametrize("wrapper", ["FP16_Optimizer", "FP16_UnfusedOptimizer"])
def test_masters_are_read_from_either_zero0_half_precision_wrapper(wrapper):
    """At ZeRO 0 in bf16/fp16 DeepSpeed wraps its own FusedAdam in FP16_Optimizer (fp32 masters in one flat buffer per
    group) and any other optimizer in FP16_UnfusedOptimizer (one fp32 tensor per parameter). The CPU build of
    FusedAdam takes minutes to compile, so the wrapper is built here around torch's AdamW: the same class and
    layout the engine builds on a GPU."""
    from deepspeed.runtime.fp16 import fused_optimizer, unfused_optimizer

    init()
    model = _tiny_bf16_bert()
    cls = getattr(fused_optimizer if wrapper == "FP16_Optimizer" else unfused_optimizer, wrapper)
    opt = cls(torch.optim.AdamW(model.parameters(), lr=1e-2), low_precision_dtype=torch.bfloat16)
    ids = torch.randint(5, 120, (2, 16))
    for _ in range(2):
        opt.backward(model(input_ids=ids, labels=ids).loss)
        opt.step()
    found = masters(opt, model)
    params = list(model.parameters())
    assert set(found) == {id(p) for p in params}
    for p in params:
        m = found[id(p)]
        assert m.device.type == "cpu" and m.dtype == torch.float32 and m.shape == p.shape
        assert torch.equal(m.to(torch.bfloat16), p.detach())  # the module holds the masters rounded to bf16
    # ... and the masters carry more than bf16 does: exporting the module's weights would lose it
    assert any(not torch.equal(found[id(p)], p.detach().float()) for p in params)


def test_bf16_training_exports_the_fp32_masters_and_the_check_refuses_the_bf16_weights(recipe, tmp_path):
    out = tmp_path / "run"
    run_inprocess(["--recipe", recipe, "--ds", DS / "zero0_bf16.json", "--output_dir", out, "--train.max_steps=4",
                   "--train.eval_every=0", "--checkpoint.every=0"])
    final = load_file(out / "final" / "model.safetensors")
    module = safe_load(out / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt")["module"]
    assert all(t.dtype == torch.float32 for t in final.values())
    weights = [k for k in final if k in module and module[k].dtype == torch.bfloat16]
    assert len(weights) > 10
    for key in weights:  # the same training: the bf16 weights are the exported masters, rounded
        assert torch.equal(final[key].to(torch.bfloat16), module[key]), key
    assert sum(not torch.equal(final[k], module[k].float()) for k in weights) > len(weights) // 2

    # the export's check is against the masters: the module's bf16 weights, written instead, are refused
    bad = tmp_path / "bad"
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    model.load_state_dict({k: (module[k].float() if k in module else v) for k, v in model.state_dict().items()})
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(out / "final").save_pretrained(bad)
    with pytest.raises(RuntimeError, match="is not the trained fp32 master weights"):
        verify_export(bad, final)
    verify_export(out / "final", final)
