"""Measuring a model: `babyllama eval ppl|mc|gen|pref`, one parser-adding function per action."""

from __future__ import annotations

import argparse

from babyllama.cli.flags import Default, add_encoding_flag, add_layout_flag, add_rope_flags, rope_from_args


def _ppl_config():
    from babyllama.eval.perplexity import PerplexityConfig

    return PerplexityConfig


def _lengths(text: str) -> list[int]:
    from babyllama.config import ConfigError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--lengths must be comma-separated integers, e.g. 256,512,1024; got {text!r}") from None


def cmd_eval_ppl(args) -> None:
    from babyllama.eval.perplexity import PerplexityConfig, format_table, perplexity

    cfg = PerplexityConfig(ckpt=args.ckpt, data=args.data, lengths=_lengths(args.lengths or ""), stride=args.stride,
                           split=args.split, max_tokens=args.max_tokens, batch_size=args.batch_size,
                           device=args.device, dtype=args.dtype, layout=args.layout, encoding=args.encoding,
                           allow_unverified=args.allow_unverified, out=args.out, rope=rope_from_args(args))
    _set_threads(args)
    result = perplexity(cfg)
    print(format_table(result))
    if "written_to" in result:
        print(f"-> {result['written_to']}")


def _add_model_flags(p, config, dtype_help: str) -> None:
    """How the evaluated model is loaded and run: the same flags for every evaluation."""
    p.add_argument("--device", default=Default(config, "device"), help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default=Default(config, "dtype"), help=dtype_help)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="load a checkpoint that has no checksums.json (not written by babyllama)")
    add_rope_flags(p)


def _set_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def add_parsers(sub) -> None:
    group = sub.add_parser("eval", help="measure a model: perplexity, multiple choice, generation, preferences").add_subparsers(
        dest="action", metavar="ACTION")
    _add_ppl(group)
    _add_mc(group)
    _add_gen(group)
    _add_pref(group)


def _add_ppl(group) -> None:
    p = group.add_parser("ppl", help="perplexity, bits per character and per byte, at one or several lengths",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Scores the same tokens at every --lengths value with sliding windows "
                                     "(every token but the first\nscored once); lengths past the model's "
                                     "trained context extend its rotary tables (with --rope-scaling, scaled).\nBits per character "
                                     "and per byte do not depend on the tokenizer. Results go to RUN/eval/ppl-DATA.json\n"
                                     "when --ckpt is a run directory (or to --out).")
    p.add_argument("--ckpt", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR|FILE",
                   help="a pretraining dataset directory (its --split) and/or text files (FILE or FILE::LAYOUT)")
    p.add_argument("--lengths", help="context lengths, comma-separated, e.g. 256,512,1024 (default: the model's)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: half of each length)")
    p.add_argument("--split", choices=["val", "train"], default=Default(_ppl_config, "split"),
                   help="split of a dataset directory (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=Default(_ppl_config, "max_tokens"),
                   help="tokens of the text scored, the same ones at every length (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=Default(_ppl_config, "batch_size"),
                   help="windows per forward pass (default %(default)s)")
    _add_model_flags(p, _ppl_config, "float32 (default), bfloat16, float16")
    p.add_argument("--out", help="write the results as JSON here (default: RUN/eval/ppl-DATA.json for a run directory)")
    add_layout_flag(p, _ppl_config, "of text files: see `babyllama data pretrain --help`")
    add_encoding_flag(p, _ppl_config)
    p.set_defaults(func=cmd_eval_ppl)


def _gen_config():
    from babyllama.eval.generation import GenerationEvalConfig

    return GenerationEvalConfig


def cmd_eval_gen(args) -> None:
    from babyllama.eval.generation import GenerationEvalConfig, evaluate_generation, format_summary

    cfg = GenerationEvalConfig(ckpt=args.ckpt, data=args.data, max_new_tokens=args.max_new_tokens,
                               max_samples=args.max_samples, batch_size=args.batch_size, layout=args.layout,
                               encoding=args.encoding, on_error=args.on_error, device=args.device, dtype=args.dtype,
                               allow_unverified=args.allow_unverified, out=args.out, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                               seed=args.seed, rope=rope_from_args(args))
    _set_threads(args)
    result = evaluate_generation(cfg)
    print(format_summary(result))
    print(f"-> {result['written_to']} (answers: {result['outputs']} beside it)")


def _add_gen(group) -> None:
    from babyllama.cli.flags import add_on_error_flag

    p = group.add_parser("gen", help="answer held-out SFT prompts; BLEU, ROUGE-L, exact match, distinct-n, looping",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="The prompt of each conversation is everything before its last assistant turn; "
                                     "that turn is the\nreference. Scores, all 0..1 and on characters: BLEU "
                                     "(sacrebleu, zh), ROUGE-L F1, exact match,\ndistinct-1/2 (variety across "
                                     "answers) and the repeated 4-gram rate (looping within an answer).\n"
                                     "Results go to RUN/eval/gen-DATA.json and every prompt, answer and reference to "
                                     "gen-DATA.jsonl\nwhen --ckpt is a run directory (or to --out and beside it).\n\n"
                                     "Layouts (--layout, or per file as FILE::LAYOUT): those of `babyllama sft`: auto "
                                     "(default), alpaca,\nsharegpt, openai, qa, csv, csv:PROMPT_COL,ANSWER_COL. A "
                                     "malformed record stops the evaluation with\nits file and line (--on-error skip "
                                     "counts it and goes on).")
    p.add_argument("--ckpt", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="held-out SFT files (FILE or FILE::LAYOUT)")
    p.add_argument("--max-new-tokens", type=int, default=Default(_gen_config, "max_new_tokens"),
                   help="tokens per answer at most (default %(default)s; at most half the model's context)")
    p.add_argument("--max-samples", type=int, default=Default(_gen_config, "max_samples"),
                   help="conversations evaluated, the first of the data (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=Default(_gen_config, "batch_size"),
                   help="prompts generated together (default %(default)s)")
    _add_model_flags(p, _gen_config, "auto (default: bf16 on GPUs that have it, float32 on CPUs), float32, bfloat16, float16")
    p.add_argument("--out", help="write the results as JSON here, the answers beside it as .jsonl "
                                 "(default: RUN/eval/gen-DATA.json for a run directory)")
    add_layout_flag(p, _gen_config, "see below")
    add_encoding_flag(p, _gen_config)
    add_on_error_flag(p, _gen_config)
    s = p.add_argument_group("sampling (default greedy without repetition penalty, so looping shows)")
    s.add_argument("--temperature", type=float, default=Default(_gen_config, "temperature"),
                   help="0 = greedy (default %(default)s)")
    s.add_argument("--top-k", type=int, default=Default(_gen_config, "top_k"), help="0 disables (default %(default)s)")
    s.add_argument("--top-p", type=float, default=Default(_gen_config, "top_p"), help="1 disables (default %(default)s)")
    s.add_argument("--repetition-penalty", type=float, default=Default(_gen_config, "repetition_penalty"),
                   help="1 disables (default %(default)s)")
    s.add_argument("--seed", type=int, help="make sampling reproducible")
    p.set_defaults(func=cmd_eval_gen)


def _mc_config():
    from babyllama.eval.multiple_choice import MultipleChoiceConfig

    return MultipleChoiceConfig


def cmd_eval_mc(args) -> None:
    from babyllama.eval.multiple_choice import MultipleChoiceConfig, evaluate_multiple_choice, format_result

    cfg = MultipleChoiceConfig(ckpt=args.ckpt, data=args.data, shots=args.shots, split=args.split, score=args.score,
                               batch_size=args.batch_size, max_questions=args.max_questions, device=args.device,
                               dtype=args.dtype, allow_unverified=args.allow_unverified, out=args.out,
                               rope=rope_from_args(args))
    _set_threads(args)
    for result in evaluate_multiple_choice(cfg):
        print(format_result(result))
        if "written_to" in result:
            print(f"-> {result['written_to']}")


def _add_mc(group) -> None:
    p = group.add_parser("mc", help="multiple-choice benchmarks: C-Eval, CMMLU, JSON lines",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Scores each option by its log-likelihood after the question, with the prompt of "
                                     "lm-evaluation-harness's\nceval-valid and cmmlu tasks; --shots K puts the first K "
                                     "solved questions of the subject's dev split\nbefore it (never the question itself). "
                                     "Prints accuracy overall and per category with a 95% interval\nand chance; every "
                                     "question's prediction goes to RUN/eval/mc-*.json (or to --out DIR).\n\n"
                                     "--data takes a benchmark directory as downloaded (C-Eval: {dev,val,test}/"
                                     "SUBJECT_SPLIT.csv; CMMLU:\n{dev,test}/SUBJECT.csv), one split's directory, "
                                     "single CSV files, or JSON lines of\n"
                                     '{"question": "...", "choices": ["...", ...], "answer": "A", "subject": "..."}.')
    p.add_argument("--ckpt", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR|FILE",
                   help="C-Eval/CMMLU directories, split directories, .csv or .jsonl files")
    p.add_argument("--shots", type=int, default=Default(_mc_config, "shots"),
                   help="solved examples before each question, from the subject's dev split (default %(default)s)")
    p.add_argument("--split", choices=["val", "test", "dev"], default=Default(_mc_config, "split"),
                   help="split of a benchmark directory; CMMLU has no val and is scored on test "
                        "(default %(default)s)")
    p.add_argument("--score", choices=["letter", "text"], default=Default(_mc_config, "score"),
                   help="letter: log-likelihood of ' A'..' D' (as the harness's acc); text: of each option's text "
                        "per character (its acc_norm) (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=Default(_mc_config, "batch_size"),
                   help="sequences per forward pass (default %(default)s)")
    p.add_argument("--max-questions", type=int, help="score only the first N questions of each subject")
    _add_model_flags(p, _mc_config, "float32 (default), bfloat16, float16")
    p.add_argument("--out", help="directory for the JSON results (default: RUN/eval for a run directory)")
    p.set_defaults(func=cmd_eval_mc)


def _pref_config():
    from babyllama.eval.preference import PreferenceEvalConfig

    return PreferenceEvalConfig


def cmd_eval_pref(args) -> None:
    from babyllama.eval.preference import PreferenceEvalConfig, evaluate_preferences, format_summary

    cfg = PreferenceEvalConfig(ckpt=args.ckpt, data=args.data, layout=args.layout, chat=args.chat,
                               max_pairs=args.max_pairs,
                               batch_size=args.batch_size, encoding=args.encoding, on_error=args.on_error,
                               device=args.device, dtype=args.dtype, allow_unverified=args.allow_unverified,
                               out=args.out)
    _set_threads(args)
    result = evaluate_preferences(cfg)
    print(format_summary(result))
    print(f"-> {result['written_to']}")


def _add_pref(group) -> None:
    from babyllama.cli.flags import add_on_error_flag

    p = group.add_parser("pref", help="preference accuracy: how often the chosen reply of a pair is the likelier",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Scores both replies of each (prompt, chosen, rejected) pair by the summed "
                                     "log-probability of their\ntokens after the prompt (chat template); a pair "
                                     "is right when the chosen one scores higher.\nAlso per token "
                                     "(length-normalised) and the mean margin. What DPO should raise on pairs\nit "
                                     "did not train on. Data: the layouts of `babyllama dpo --help`. Results go to "
                                     "RUN/eval/pref-DATA.json\n(or --out).")
    p.add_argument("--ckpt", required=True, help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="preference files (FILE or FILE::LAYOUT)")
    p.add_argument("--no-chat", dest="chat", action="store_false",
                   help="plain-text pairs: a prompt and two continuations, no chat template (as `dpo --no-chat`)")
    p.add_argument("--max-pairs", type=int, default=Default(_pref_config, "max_pairs"),
                   help="pairs scored, the first of the data (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=Default(_pref_config, "batch_size"),
                   help="pairs scored together (default %(default)s)")
    p.add_argument("--device", default=Default(_pref_config, "device"), help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default=Default(_pref_config, "dtype"), help="float32 (default), bfloat16, float16")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="load a checkpoint that has no checksums.json (not written by babyllama)")
    p.add_argument("--out", help="write the results as JSON here (default: RUN/eval/pref-DATA.json)")
    add_layout_flag(p, _pref_config, "see `babyllama dpo --help`")
    add_encoding_flag(p, _pref_config)
    add_on_error_flag(p, _pref_config)
    p.set_defaults(func=cmd_eval_pref)
