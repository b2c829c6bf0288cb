"""Our model against transformers' LlamaForCausalLM with the same weights: an independent reference
for RMSNorm, RoPE layout, GQA and SwiGLU (and the basis of exporting as a stock Llama later)."""

import pytest
import torch

from babyllama.export.hf import to_hf_model as to_hf
from babyllama.model import Llama
from tests.conftest import tiny_model_config

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tie,n_kv", [(True, 2), (False, 4)])
def test_logits_match_transformers_llama(tie, n_kv):
    model = Llama(tiny_model_config(tie_embeddings=tie, n_kv_heads=n_kv)).eval()
    with torch.no_grad():  # random norm gains, so the norms are really compared too
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    hf = to_hf(model)
    tokens = torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)
