"""An independent reference for the DPO/IPO objective: TRL's own `DPOTrainer` on the same batch.

One tiny Llama is the reference, a perturbed copy the policy; both go to TRL as stock
`LlamaForCausalLM`s (export/hf.py). TRL tokenizes a small text preference set with a word-level
tokenizer, collates it and computes its loss and logged metrics; the same collated batch, rewritten
into our (tokens, targets, ref) pairs, goes through `PreferencePairs.loss`. Loss, rewards, margins,
accuracies and log-probs must agree, and our targets must cover exactly the tokens TRL scores.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")

from babyllama.align.dpo import PreferencePairs, sequence_logps  # noqa: E402
from bench.dpo_vs_trl import trl_batch_as_ours  # noqa: E402  (TRL's rows as our pairs)
from babyllama.config import IGNORE_INDEX  # noqa: E402
from babyllama.data.preference import PairSample, collate_pairs  # noqa: E402
from babyllama.export.hf import to_hf_model  # noqa: E402
from babyllama.model import Llama  # noqa: E402
from tests.conftest import tiny_model_config  # noqa: E402

BETA = 0.1
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
WORDS = ("the a cat dog bird fish sat ran flew swam on in under over mat tree sky sea red blue green big small "
         "quickly slowly today yesterday what where did go is was yes no maybe").split()

# (prompt, chosen, rejected): replies start with a space (TRL concatenates prompt + reply as text) and
# have different lengths, so the collated rows are right-padded to different widths
EXAMPLES = [
    ("where did the cat sit", " the cat sat on the mat", " blue"),
    ("what is red", " the big red bird", " the sea is green and the sky is red today"),
    ("where did the dog go", " the dog ran under the tree yesterday", " a fish swam"),
    ("is the sky blue", " yes", " no the sky is green"),
    ("what was small", " a small fish in the sea", " the big dog was slowly over the red mat today"),
]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def _models(vocab_size: int):
    reference = Llama(tiny_model_config(vocab_size=vocab_size, max_seq_len=64)).float().eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            if p.dim() >= 2:
                p.add_(0.05 * torch.randn_like(p))  # log-ratios of order 1 nat: beta or length slips show
    return policy, reference


def _trainer(tmp_path, loss: str, policy, reference, tokenizer):
    import dataclasses

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_dict({"prompt": [p for p, _, _ in EXAMPLES], "chosen": [c for _, c, _ in EXAMPLES],
                                 "rejected": [r for _, _, r in EXAMPLES]})
    # transformers 5 renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = DPOConfig(output_dir=str(tmp_path / loss), beta=BETA, loss_type=[loss],
                     per_device_train_batch_size=len(EXAMPLES), report_to="none", use_cpu=True, bf16=False,
                     fp16=False, precompute_ref_log_probs=False, max_length=None, disable_dropout=True, seed=0,
                     save_strategy="no", logging_strategy="no", **{checkpointing: False})
    return DPOTrainer(model=to_hf_model(policy), ref_model=to_hf_model(reference), args=args,
                      train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_objective_matches_trl(tmp_path, loss):
    tokenizer = _tokenizer()
    policy, reference = _models(vocab_size=len(tokenizer))
    trainer = _trainer(tmp_path, loss, policy, reference, tokenizer)
    n = len(EXAMPLES)
    examples = [trainer.train_dataset[i] for i in range(n)]
    batch = trainer.data_collator(examples)
    assert batch["input_ids"].shape[0] == 2 * n

    # TRL's side: the loss of its own training step and the metrics it logs
    trainer.model.train()
    trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False).item()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trl_ref_chosen, trl_ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)

    # the same batch in our layout, and the same pairs through our own collation of (ids, labels)
    tokens, targets = trl_batch_as_ours(batch, tokenizer.pad_token_id)
    samples = [PairSample(*[(e["prompt_ids"] + e[side], [IGNORE_INDEX] * len(e["prompt_ids"]) + e[side])
                            for side in ("chosen_ids", "rejected_ids")]) for e in examples]
    c_tokens, c_targets, _ = collate_pairs(samples, tokenizer.pad_token_id)
    assert torch.equal(c_tokens, tokens) and torch.equal(c_targets, targets)

    # position by position: our targets are the reply tokens TRL scores (its labels shifted), no more, no less
    scored = batch["completion_mask"][:, 1:].bool()  # TRL: labels[:, 1:] != -100
    assert scored.shape[1] == targets.shape[-1]
    for i in range(n):
        for side in range(2):
            row = side * n + i
            assert torch.equal(targets[i, side] != IGNORE_INDEX, scored[row]), (i, side)
            reply = targets[i, side][scored[row]]
            assert torch.equal(reply, batch["input_ids"][row, 1:][scored[row]])
            assert len(reply) == int(batch["completion_mask"][row].sum())  # every reply token, the first included
            assert reply[-1].item() == tokenizer.eos_token_id  # TRL appends EOS to a non-conversational reply
    assert int((targets != IGNORE_INDEX).sum()) == int(scored.sum())

    # our side
    with torch.no_grad():
        ref = sequence_logps(reference, tokens, targets)
    policy.train()
    ours, metrics = PreferencePairs(BETA, loss).loss(policy, (tokens, targets, ref))
    mean = {k: v.item() / n for k, v in metrics.items()}

    # the policy differs from the reference: the log-ratios are not trivially zero
    assert (logged["rewards/chosen"], logged["rewards/rejected"]) != (0.0, 0.0)
    assert abs(logged["rewards/margins"]) > 1e-3
    torch.testing.assert_close(ref[:, 0], trl_ref_chosen.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(ref[:, 1], trl_ref_rejected.float(), atol=1e-4, rtol=0)
    pairs = [(trl_loss, ours.item() / n, "loss"),
             (logged["rewards/chosen"], mean["reward_chosen"], "rewards/chosen"),
             (logged["rewards/rejected"], mean["reward_rejected"], "rewards/rejected"),
             (logged["rewards/margins"], mean["reward_margin"], "rewards/margins"),
             (logged["rewards/accuracies"], mean["pref_accuracy"], "rewards/accuracies"),
             (logged["logps/chosen"], mean["logp_chosen"], "logps/chosen"),
             (logged["logps/rejected"], mean["logp_rejected"], "logps/rejected")]
    for theirs, mine, name in pairs:
        assert mine == pytest.approx(theirs, abs=1e-4), f"{name}: TRL {theirs:.6f}, ours {mine:.6f}"
