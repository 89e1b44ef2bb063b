"""The 4-bit path on a real GPU; skipped where there is no CUDA."""
import pytest
import torch

from adapterkit.config import load_config

pytestmark = pytest.mark.cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nf4_sft_on_cuda(tiny_dir, tmp_path):
    import bitsandbytes as bnb
    from adapterkit.stages.sft import setup_sft
    config = load_config("sft", "tiny_sft", [f"output.dir={tmp_path}", "train.max_steps=5",
                                              "base.compute_dtype=bfloat16", "train.progress=false",
                                              "train.gradient_checkpointing=true"])
    run = setup_sft(config)
    model = run.trainer.model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and layers[0].weight.device.type == "cuda"
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    result = run.trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
