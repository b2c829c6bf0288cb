"""An independent reference for the GRPO objective: TRL's own `GRPOTrainer._compute_loss` on the same group.

One tiny Llama goes to TRL as a stock `LlamaForCausalLM` (export/hf.py, saved and loaded by TRL from
its directory). A group of four completions of one prompt (unequal lengths: right padding) with
old and reference log-probs that differ from the policy's (so ratios leave 1, some are clipped, and
the KL term is not zero) and the group's advantages, each computed by TRL's own normalisation (and the paper's KL term: TRL's
`use_bias_correction_kl`, on by default in TRL 1.x, weights it by the ratio; ours does not):
TRL's loss (loss_type "grpo", its own per-token log-probs) and ours (`GroupPolicy.loss` on our
layout of the same tokens) must agree, and so must the per-token log-probs, position by position.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

trl = pytest.importorskip("trl")

from babyllama.align.grpo import GroupPolicy, group_advantages  # noqa: E402
from babyllama.config import IGNORE_INDEX  # noqa: E402
from babyllama.export.hf import to_hf_model  # noqa: E402
from babyllama.model import Llama  # noqa: E402
from tests.align.test_dpo_vs_trl import _tokenizer  # noqa: E402
from tests.conftest import tiny_model_config  # noqa: E402

BETA, CLIP = 0.04, 0.2


def _trainer(tmp_path, model, tokenizer):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    to_hf_model(model).save_pretrained(tmp_path / "hf")
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    # TRL 1.x multiplies the KL term by the importance ratio by default; the paper's formula (ours) does not
    bias_correction = {"use_bias_correction_kl": False} if "use_bias_correction_kl" in names else {}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = GRPOConfig(output_dir=str(tmp_path / "out"), model_init_kwargs={"dtype": torch.float32},
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=8, loss_type="grpo",
                      beta=BETA, epsilon=CLIP, report_to="none", use_cpu=True, bf16=False, fp16=False,
                      disable_dropout=True, save_strategy="no", logging_strategy="no", seed=0,
                      **{checkpointing: False}, **bias_correction)
    return GRPOTrainer(model=str(tmp_path / "hf"), reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(prompts)],
                       args=args, train_dataset=Dataset.from_dict({"prompt": ["the cat"] * 4}),
                       processing_class=tokenizer)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_grpo_objective_matches_trl(tmp_path):
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=len(tokenizer), max_seq_len=64)).float().train()
    trainer = _trainer(tmp_path, model, tokenizer)
    prompt = tokenizer("where did the cat sit")["input_ids"]
    completions = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in
                   ("the cat sat on the mat", "blue", "the dog ran under the tree", "yes the sky")]
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])
    width = max(len(c) for c in completions)
    completion_ids = torch.full((4, width), tokenizer.pad_token_id)
    completion_mask = torch.zeros(4, width, dtype=torch.long)
    for i, c in enumerate(completions):
        completion_ids[i, :len(c)], completion_mask[i, :len(c)] = torch.tensor(c), 1
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # old and reference log-probs near the policy's, not equal to them
        theirs = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([torch.tensor([prompt] * 4), completion_ids], 1),
            torch.cat([torch.ones(4, len(prompt), dtype=torch.long), completion_mask], 1), width)[0]
    old = theirs + 0.3 * torch.randn(theirs.shape, generator=g)
    ref = theirs + 0.5 * torch.randn(theirs.shape, generator=g)
    grouped = rewards.view(1, 4)  # the advantages as TRL normalises a group
    trl_adv = ((grouped - grouped.mean(1, keepdim=True)) /
               (trl.trainer.utils.nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)).view(-1)
    torch.testing.assert_close(group_advantages(rewards, 4), trl_adv)
    inputs = {"prompt_ids": torch.tensor([prompt] * 4), "prompt_mask": torch.ones(4, len(prompt), dtype=torch.long),
              "completion_ids": completion_ids, "completion_mask": completion_mask, "advantages": trl_adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trl_loss = trainer._compute_loss(trainer.model, inputs).item()

    # ours: prompt + completion in one row, the completion's tokens the targets
    n = len(prompt) + width - 1
    tokens = torch.full((4, n), tokenizer.pad_token_id)
    targets = torch.full((4, n), IGNORE_INDEX)
    ours_old, ours_ref = torch.zeros(4, n), torch.zeros(4, n)
    for i, c in enumerate(completions):
        seq = prompt + c
        tokens[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        span = slice(len(prompt) - 1, len(seq) - 1)
        targets[i, span] = torch.tensor(c)
        ours_old[i, span], ours_ref[i, span] = old[i, :len(c)], ref[i, :len(c)]
    batch = (tokens, targets, ours_old, ours_ref, rewards, group_advantages(rewards, 4))
    objective = GroupPolicy(BETA, CLIP)
    loss, metrics = objective.loss(model, batch)
    ours = loss.item() / objective.count(batch)
    assert metrics["clip_fraction"].item() > 0  # the clipping acts in this group
    assert ours == pytest.approx(trl_loss, rel=1e-4, abs=1e-5)
    with torch.no_grad():  # position by position: our log-probs are TRL's, on the completion tokens only
        logps = -model(tokens, targets, reduction="none")
    for i, c in enumerate(completions):
        got = logps[i][targets[i] != IGNORE_INDEX]
        torch.testing.assert_close(got, theirs[i, :len(c)], rtol=1e-4, atol=1e-4)
