"""Fine-tune a seq2seq model or a classifier with any attention mechanism, with accelerate.

Seq2seq (translation, summarization) with per-role mechanisms, from a local model or a tiny
model built from a config; a tokenizer is built from the training split when the model has none
(subword Unigram by default, ``--tokenizer bpe|word``); BLEU, chrF and exact match are measured
against the raw target strings of the data file:

    python scripts/finetune.py --task seq2seq --train-file train.jsonl --valid-file valid.jsonl \\
        --source-column en --target-column de --from-config --arch bart --d-model 64 \\
        --encoder-attn sparsemax --cross-attn "entmax:alpha=learned" --output-dir out/bart

    python scripts/finetune.py --task seq2seq --model-dir path/to/marian ... --cross-attn "fusedmax:lam=0.1"

Classification (any family that uses transformers' AttentionInterface) with ``--attn``, learned
parameters and schedules included (``hf_models.sparsify``):

    python scripts/finetune.py --task classification --train-file train.csv --valid-file valid.csv \\
        --text-column text --label-column label --model-dir path/to/roberta --attn sparsemax

    python scripts/finetune.py --task classification ... --model-dir path/to/bert \\
        --attn "entmax:alpha=1.5" --attn-schedule "linear:start=1,steps=50"

Launchers: ``python scripts/finetune.py ...``, ``accelerate launch scripts/finetune.py ...``;
data-parallel on CPU (gloo): ``accelerate launch --num_processes 2 --cpu scripts/finetune.py ...``
(accelerate 1.x starts one process for ``--cpu`` and expects mpirun for the others; the script
then re-launches itself as N workers with torch.distributed.run),
``accelerate launch --multi_gpu --num_processes 2 scripts/finetune.py ...`` or
``torchrun --nproc_per_node 2 scripts/finetune.py ...``.

A model built with ``--from-config`` starts from weights of standard deviation d_model ** -0.5
(``--init-std``), as fairseq's do; with transformers' 0.02 a narrow model's decoder learns the target
language and ignores its source. Translation from scratch trains best as fairseq does: ``--max-tokens
1024`` (batches of similar length), ``--lr-scheduler inverse_sqrt --warmup-steps 100`` and
``--label-smoothing 0.1`` (scripts/real_tasks.py uses these).

Writes the model (safetensors) and tokenizer to ``--output-dir``, ``metrics.json`` there, and
prints the metrics as the last line of its output (JSON). ``--test-file`` is evaluated once with
the final model (``test_*`` metrics); ``--predictions-file`` writes source, prediction and reference
of each evaluated example as jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedDataParallelKwargs, set_seed  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import hf_models  # noqa: E402  (registers the attention implementations and the Sparse* classes)
import plugin  # noqa: E402

SEQ2SEQ_ARCHS = tuple(hf_models.SPARSE_FAMILIES)
CLASSIFIER_ARCHS = ("bert", "roberta") + tuple(f for f, c in hf_models.SPARSE_FAMILIES.items() if "classification" in c)
ROLE_FLAGS = {"encoder_attn": "--encoder-attn", "decoder_attn": "--decoder-attn", "cross_attn": "--cross-attn"}
SCHEDULE_FLAGS = {f"{flag}-schedule": f"{field}_schedule" for field, flag in ROLE_FLAGS.items()}
TRANSFORMERS_IMPLEMENTATIONS = hf_models.compat.TRANSFORMERS_NAMES  # --attn values: transformers' own attention
SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
LR_SCHEDULERS = ("linear", "inverse_sqrt", "constant")
TOKENIZERS = ("unigram", "bpe", "word")  # built from the training split when the model has none
PROGRESS_LINES = 10  # without a terminal: about this many plain progress lines per run ...
PROGRESS_SECONDS = 60.0  # ... and at least one line this often
SMALL_MACHINE_CORES = 4  # --threads 0: one thread per process up to this many cores per process


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default (unless it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--task", required=True, choices=("seq2seq", "classification"), help="what to train")
    data = ap.add_argument_group("data (local json / jsonl / csv / tsv files, read with datasets)")
    data.add_argument("--train-file", required=True, help="training examples")
    data.add_argument("--valid-file", required=True, help="validation examples (evaluated at the end)")
    data.add_argument("--source-column", default="source", help="seq2seq input column")
    data.add_argument("--target-column", default="target", help="seq2seq output column")
    data.add_argument("--text-column", default="text", help="classification input column")
    data.add_argument("--label-column", default="label", help="classification label column")
    data.add_argument("--max-train-examples", type=int, default=0, help="use only the first N (0 = all)")
    data.add_argument("--max-valid-examples", type=int, default=0, help="use only the first N (0 = all)")
    data.add_argument("--max-source-length", type=int, default=128, help="truncate inputs to N tokens")
    data.add_argument("--max-target-length", type=int, default=128, help="truncate targets to N tokens")

    model = ap.add_argument_group("model")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", help="a local transformers model (stock or Sparse*)")
    source.add_argument("--from-config", action="store_true", help="build a small model from --arch and sizes")
    model.add_argument("--arch", choices=sorted(set(SEQ2SEQ_ARCHS + CLASSIFIER_ARCHS)), default=None,
                       help="model family for --from-config")
    model.add_argument("--d-model", type=int, default=64, help="--from-config: hidden size")
    model.add_argument("--layers", type=int, default=2, help="--from-config: encoder (and decoder) layers")
    model.add_argument("--heads", type=int, default=4, help="--from-config: attention heads")
    model.add_argument("--ffn-dim", type=int, default=128, help="--from-config: feed-forward size")
    model.add_argument("--dropout", type=float, default=0.1,
                       help="--from-config: dropout (and attention dropout unless --attention-dropout)")
    model.add_argument("--attention-dropout", type=float, default=None,
                       help="--from-config: dropout on the attention weights (default: --dropout). Attention "
                       "dropout needs the weights formed, so it keeps the sparse mechanisms on their reference "
                       "path; 0 lets the fused CPU / GPU paths run (fairseq's default)")
    model.add_argument("--max-positions", type=int, default=256, help="--from-config: longest sequence")
    model.add_argument("--init-std", type=float, default=None,
                       help="--from-config (bart, mbart, marian, pegasus): standard deviation of the initial "
                       "weights and embeddings. Default: d_model ** -0.5, so that the embeddings, scaled by "
                       "sqrt(d_model), start at unit size, as in fairseq. transformers' 0.02 suits wide pretrained "
                       "models; in a narrow model built from scratch it leaves the cross-attention path so weak "
                       "that the decoder learns the target language and ignores the source")
    model.add_argument("--encoder-attn", help="spec of encoder self-attention (Sparse* classes)")
    model.add_argument("--decoder-attn", help="spec of decoder self-attention (Sparse* classes)")
    model.add_argument("--cross-attn", help="spec of cross-attention (Sparse* classes)")
    model.add_argument("--attn", help="the spec of every attention module, such as 'sparsemax', "
                       "'entmax:alpha=1.3' or 'entmax:alpha=learned' (learned parameters and --attn-schedule give "
                       "each module its own mechanism: hf_models.sparsify), or transformers' eager/sdpa")
    model.add_argument("--attn-schedule", metavar="SCHEDULE",
                       help="with --attn: move a parameter of its spec with the optimizer step, e.g. "
                       "'linear:start=1,steps=50' (alpha from softmax to the spec's value); strategies: "
                       f"{', '.join(plugin.STRATEGIES)}; keys: param, start, end, steps, warmup, hold")
    for flag, field in SCHEDULE_FLAGS.items():
        model.add_argument(flag, dest=field, metavar="SCHEDULE",
                           help=f"move a parameter of {ROLE_FLAGS[field.removesuffix('_schedule')]}'s spec with the "
                                f"optimizer step, e.g. 'cosine:start=1,steps=500' (alpha from softmax to the spec's "
                                f"value); strategies: {', '.join(plugin.STRATEGIES)}; keys: param, start, end, "
                                f"steps, warmup, hold")

    train = ap.add_argument_group("training")
    train.add_argument("--output-dir", required=True, help="where the model, tokenizer and metrics.json go")
    train.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    train.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0 = epochs)")
    train.add_argument("--batch-size", type=int, default=16, help="per process")
    train.add_argument("--eval-batch-size", type=int, default=32, help="per process")
    train.add_argument("--lr", type=float, default=5e-4,
                       help="peak learning rate of AdamW (linear decay); a small model built with --from-config "
                       "learns faster with about 3e-3, a pretrained one is usually fine-tuned with 1e-5 to 1e-4")
    train.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, norms)")
    train.add_argument("--attention-lr", type=float, default=None,
                       help="peak learning rate of the attention mechanisms' own parameters (a learned alpha), "
                       "without weight decay (default: --lr, with --weight-decay). A pretrained model's --lr "
                       "moves alpha very little in a short fine-tuning")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    train.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="linear",
                       help="after the warm-up: linear decay to 0 at the last step, inverse_sqrt (lr * "
                       "sqrt(warmup / step), fairseq's and Vaswani et al.'s; needs --warmup-steps > 0) or constant")
    train.add_argument("--label-smoothing", type=float, default=0.0,
                       help="label smoothing of the training loss (0.1 is usual for translation; the reported "
                       "valid_loss / test_loss stay the plain cross-entropy)")
    train.add_argument("--max-tokens", type=int, default=0,
                       help="training batches of examples of similar length (source or target, the longer), "
                       "at most this many padded tokens each and at most --batch-size examples, in random order "
                       "(fairseq's --max-tokens); 0 = --batch-size examples drawn at random, padded to the "
                       "longest of each batch")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0 = no clipping)")
    train.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                       help="default: accelerate's configuration (or 'no')")
    train.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    train.add_argument("--seed", type=int, default=0, help="random seed")
    train.add_argument("--num-beams", type=int, default=1, help="seq2seq evaluation: beam size of generate()")
    train.add_argument("--max-new-tokens", type=int, default=64, help="seq2seq evaluation: generation length")
    train.add_argument("--eval-every-epoch", action="store_true",
                       help="evaluate after every epoch (default: at the end)")
    train.add_argument("--save-state", action="store_true", help="also save accelerate's training state")
    train.add_argument("--log-attention-every", type=int, default=None, metavar="N",
                       help="record the learned or scheduled attention parameters (alpha per layer and head) every "
                       "N optimizer updates in metrics.json ('attention_parameters'); 0 = never; default: at every "
                       "evaluation")
    train.add_argument("--find-unused-parameters", action="store_true",
                       help="let DDP skip parameters without gradients (slower; for models with unused parameters)")
    train.add_argument("--threads", type=int, default=0,
                       help="torch threads per process; 0 = automatic: $OMP_NUM_THREADS when set, else one thread "
                       f"when a process has at most {SMALL_MACHINE_CORES} cores (small models on small machines "
                       "run much faster so), else the cores per process")
    add_text_options(ap)
    args = ap.parse_args(argv)
    check_text_options(ap, args)

    roles = {field: getattr(args, field) for field in ROLE_FLAGS if getattr(args, field)}
    if roles and args.attn:
        ap.error("--attn (one attn_implementation) and --encoder-attn/--decoder-attn/--cross-attn (per-role "
                 "Sparse* classes) are exclusive")
    if args.from_config and args.arch is None:
        ap.error("--from-config needs --arch")
    if args.log_attention_every is not None and args.log_attention_every < 0:
        ap.error(f"--log-attention-every must be an integer >= 0 (0 = never), got {args.log_attention_every}")
    if args.attn and args.attn not in TRANSFORMERS_IMPLEMENTATIONS:
        try:
            args.attn = plugin.canonical_spec(args.attn)
        except ValueError as err:
            ap.error(f"--attn: {err} (or one of transformers' own: {', '.join(TRANSFORMERS_IMPLEMENTATIONS)})")
    if args.attn_schedule:
        if not args.attn or args.attn in TRANSFORMERS_IMPLEMENTATIONS:
            ap.error("--attn-schedule moves a parameter of --attn's spec; give --attn a spec such as "
                     "'entmax:alpha=1.5' (per-role models: --encoder-attn-schedule, --decoder-attn-schedule, "
                     "--cross-attn-schedule)")
        try:
            args.attn_schedule = str(plugin.parse_schedule(args.attn_schedule, args.attn, name="--attn-schedule"))
        except ValueError as err:
            ap.error(str(err))
    if args.from_config:
        valid = SEQ2SEQ_ARCHS if args.task == "seq2seq" else CLASSIFIER_ARCHS
        if args.arch not in valid:
            ap.error(f"--arch {args.arch} cannot do {args.task}; valid choices: {', '.join(valid)}")
        if args.task == "classification" and roles and args.arch not in hf_models.SPARSE_FAMILIES:
            ap.error(f"--arch {args.arch}: per-role flags need a Sparse* family "
                     f"({', '.join(hf_models.SPARSE_FAMILIES)}); use --attn")
    if args.init_std is not None and not (args.init_std > 0 and args.from_config
                                          and args.arch in ("bart", "mbart", "marian", "pegasus")):
        ap.error(f"--init-std must be a number > 0 and needs --from-config with --arch bart, mbart, marian or "
                 f"pegasus, got {args.init_std} (--arch {args.arch})")
    if not 0.0 <= args.label_smoothing < 1.0:
        ap.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.max_tokens < 0:
        ap.error(f"--max-tokens must be an integer >= 0 (0 = batches of --batch-size examples), got {args.max_tokens}")
    if args.lr_scheduler == "inverse_sqrt" and args.warmup_steps <= 0:
        ap.error("--lr-scheduler inverse_sqrt decays as sqrt(warmup / step): give --warmup-steps > 0")
    if args.attention_lr is not None and not args.attention_lr > 0:
        ap.error(f"--attention-lr must be a number > 0, got {args.attention_lr}")
    for name in ("dropout", "attention_dropout"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value < 1.0:
            ap.error(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    if args.attention_dropout is not None and args.arch == "t5" and args.attention_dropout != args.dropout:
        ap.error("--attention-dropout: t5 drops its attention weights with its one dropout rate; use --dropout")
    for field, spec in roles.items():
        try:
            plugin.canonical_spec(spec)
        except ValueError as err:
            ap.error(f"{ROLE_FLAGS[field]}: {err}")
    for flag, field in SCHEDULE_FLAGS.items():
        text = getattr(args, field)
        if not text:
            continue
        if args.attn:
            ap.error(f"{flag} needs the per-role Sparse* classes; it does not combine with --attn")
        spec_field = field.removesuffix("_schedule")
        try:  # against the role's spec when given here (a --model-dir's own spec is checked by its config)
            if spec_field in roles:
                plugin.parse_schedule(text, roles[spec_field], name=flag)
            else:
                plugin.schedule.check_schedule_syntax(text, name=flag)
        except ValueError as err:
            ap.error(str(err))
        roles[field] = text
    args.roles = roles
    return args


def add_text_options(ap: argparse.ArgumentParser) -> None:
    text = ap.add_argument_group("tokenizer built from the data, evaluation and predictions")
    text.add_argument("--tokenizer", choices=TOKENIZERS, default=None,
                      help="the tokenizer trained on the training split (source and target texts) when the model "
                      "has none: unigram or bpe (subwords: words unseen in training are spelled with pieces; "
                      "decoding restores spaces and punctuation as written) or word (one token per word or "
                      "punctuation mark; unseen words become <unk>). Default: unigram")
    text.add_argument("--vocab-size", type=int, default=8000,
                      help="size of the tokenizer built from the data (at most; special tokens included)")
    text.add_argument("--test-file", help="test examples (same format and columns), evaluated once at the end with "
                      "the final model: test_* metrics")
    text.add_argument("--predictions-file", metavar="PATH",
                      help="write source, prediction and reference of every example of the last validation "
                      "(and of the test set) as jsonl, one object per line with its split")


def check_text_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.vocab_size < len(SPECIALS) + 1:
        ap.error(f"--vocab-size must be at least {len(SPECIALS) + 1} (the special tokens and one more), "
                 f"got {args.vocab_size}")
    if args.tokenizer is not None and has_tokenizer(args.model_dir):
        ap.error(f"--tokenizer {args.tokenizer}: {args.model_dir} has its own tokenizer, which is used; "
                 "--tokenizer only chooses the one built from the data when the model has none")
    if args.test_file and Path(args.test_file).suffix.lower() != Path(args.train_file).suffix.lower():
        ap.error(f"--test-file must have the format of --train-file ({Path(args.train_file).suffix}), "
                 f"got {args.test_file}")


def choose_threads(requested: int = 0) -> int:
    """Intra-op threads for this process: ``requested`` if > 0, else the automatic choice of ``--threads``.

    On a small machine, several OpenMP threads per process wait on each other (and on other
    processes) far more than they compute for the small matrices of small models: measured on a
    shared 2-core machine, 2 epochs of the README's fairseq example took minutes with torch's
    default threads and seconds with one (docs/fairseq.md).
    """
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    return 1 if per_process <= SMALL_MACHINE_CORES else per_process


def _parent_num_processes() -> int | None:
    """``--num_processes N`` of the ``accelerate launch`` command that started this process (Linux /proc)."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        value = None
        if arg in ("--num_processes", "--num-processes") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("--num_processes=", "--num-processes=")):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def check_launch() -> None:
    """Make ``accelerate launch --cpu --num_processes N`` data-parallel.

    accelerate's launcher starts a single process for ``--cpu`` and leaves the other N - 1 to
    ``mpirun``; it sets ``MASTER_ADDR`` but no world size. Without MPI that run would silently
    train in one process, so this process re-launches the script as N workers with
    ``torch.distributed.run`` (gloo), which accelerate then recognizes as a multi-CPU run.
    """
    world = [os.environ.get(k) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")]
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or not os.environ.get("MASTER_ADDR") or any(world):
        return
    n = _parent_num_processes()
    if n is None or n < 2:
        raise SystemExit(
            "finetune.py: started by `accelerate launch --cpu` with several processes, but their number could not "
            "be read. Use `torchrun --nproc_per_node N scripts/finetune.py ...` (gloo backend)."
        )
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
           f"--master_addr={os.environ['MASTER_ADDR']}", f"--master_port={os.environ.get('MASTER_PORT', '29500')}",
           str(Path(__file__).resolve()), *sys.argv[1:]]
    print(f"finetune.py: starting {n} CPU worker processes (gloo) for `accelerate launch --cpu`", flush=True)
    raise SystemExit(subprocess.call(cmd))


# ----------------------------------------------------------------------------- data


def load_splits(args: argparse.Namespace, cache_dir: str) -> Any:
    """The splits ``train``, ``validation`` (and ``test`` with ``--test-file``) as a ``DatasetDict``."""
    from datasets import load_dataset

    files = {"train": args.train_file, "validation": args.valid_file}
    if getattr(args, "test_file", None):
        files["test"] = args.test_file
    suffixes = {Path(f).suffix.lower() for f in files.values()}
    if len(suffixes) != 1:
        raise SystemExit(f"finetune.py: train and valid files must have the same format, got {sorted(suffixes)}")
    suffix = suffixes.pop()
    if suffix in (".json", ".jsonl"):
        raw = load_dataset("json", data_files=files, cache_dir=cache_dir)
    elif suffix in (".csv", ".tsv"):
        raw = load_dataset("csv", data_files=files, cache_dir=cache_dir, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise SystemExit(f"finetune.py: unsupported data format {suffix!r}; valid: .json, .jsonl, .csv, .tsv")
    for split, limit in (("train", args.max_train_examples), ("validation", args.max_valid_examples)):
        if limit:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    if args.task == "seq2seq":
        columns = [args.source_column, args.target_column]
    else:
        columns = [args.text_column, args.label_column]
    for split in raw:
        missing = [c for c in columns if c not in raw[split].column_names]
        if missing:
            raise SystemExit(f"finetune.py: {split} file lacks column(s) {missing}; it has {raw[split].column_names}")
    return raw


def _finish_tokenizer(tok: Any, task: str) -> Any:
    """Add the template (seq2seq: "x </s>" as Marian/T5 do; classification: "<s> x </s>", the first token
    pools) and wrap ``tok`` as a transformers tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    eos, bos = SPECIALS["eos"], SPECIALS["bos"]
    single = f"$A {eos}" if task == "seq2seq" else f"{bos} $A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIALS["pad"], bos_token=bos, eos_token=eos, unk_token=SPECIALS["unk"],
        clean_up_tokenization_spaces=False,
    )


def _whitespace_normalizer() -> Any:
    """Runs of whitespace (tabs, newlines, several spaces) become one space; ends are stripped."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])


def build_word_tokenizer(texts: list[str], task: str, vocab_size: int = 8000) -> Any:
    """A word-level tokenizer over ``texts``: one token per word (a run of characters that are neither
    space nor punctuation) and one per punctuation mark, at most ``vocab_size`` entries; every word not
    seen in ``texts`` is ``<unk>``.

    A space before a token is part of it (``"▁Mann"``, ``","``), so decoding restores the spaces as
    written: ``"Ein Mann, der"`` decodes to itself, not to ``"Ein Mann , der"``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk"]))
    tok.normalizer = normalizers.Sequence([
        _whitespace_normalizer(), normalizers.Prepend(" "), normalizers.Replace(" ", "\u2581"),
    ])
    mark = "\u2581"  # the space mark of Metaspace
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{mark}?\\p{{P}}|{mark}?[^{mark}\\p{{P}}]+|{mark}"),
                                             behavior="isolated")
    tok.decoder = decoders.Metaspace()  # marks back to spaces, the first one dropped
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                        show_progress=sys.stderr.isatty())
    tok.train_from_iterator(texts, trainer)
    return _finish_tokenizer(tok, task)


def build_subword_tokenizer(texts: list[str], task: str, kind: str = "unigram", vocab_size: int = 8000) -> Any:
    """A subword tokenizer trained on ``texts``: ``kind`` ``"unigram"`` (SentencePiece's model) or ``"bpe"``.

    Words are split at spaces, marked with a leading ``"▁"`` (Metaspace), so decoding restores the
    text as written (spaces and punctuation, runs of whitespace as one space). A word unseen in
    ``texts`` is spelled with pieces; only characters never seen (nor ASCII letters, digits and
    punctuation, always in the vocabulary) become ``<unk>``.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(SPECIALS.values())
    alphabet = list(string.ascii_letters + string.digits + string.punctuation)
    show = sys.stderr.isatty()
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer: Any = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                               unk_token=SPECIALS["unk"], initial_alphabet=alphabet,
                                               show_progress=show)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk"]))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                      show_progress=show)
    else:
        raise ValueError(f"kind must be one of unigram, bpe, got {kind!r}")
    tok.normalizer = _whitespace_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer)
    return _finish_tokenizer(tok, task)


def build_tokenizer(texts: list[str], task: str, kind: str = "unigram", vocab_size: int = 8000) -> Any:
    """The tokenizer ``--tokenizer kind`` trained on ``texts`` (the training split only)."""
    if kind not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {kind!r}")
    if kind == "word":
        return build_word_tokenizer(texts, task, vocab_size)
    return build_subword_tokenizer(texts, task, kind, vocab_size)


def has_tokenizer(model_dir: str | None) -> bool:
    if not model_dir:
        return False
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "source.spm", "vocab.txt")
    return any((Path(model_dir) / n).exists() for n in names)


class LengthBatchSampler:
    """Training batches of examples of similar length, in a new random order at every pass.

    The examples are shuffled, then sorted by length (the shuffle breaks ties differently each pass)
    and cut into batches of at most ``max_tokens`` padded tokens (examples times the longest length of
    the batch) and at most ``batch_size`` examples; the batches are then shuffled. Padding to the
    longest of a random batch wastes about half the work on short texts of varied length; here it
    wastes little. Every process draws the same batches (the same ``seed`` and pass number), as a
    data-parallel run's sharding of the batches expects.
    """

    def __init__(self, lengths: list[int], max_tokens: int, batch_size: int = 0, seed: int = 0) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
        if any(n > max_tokens for n in lengths):
            raise ValueError(f"max_tokens ({max_tokens}) is less than the longest example ({max(lengths)} tokens); "
                             "raise --max-tokens or lower --max-source-length / --max-target-length")
        self.lengths, self.max_tokens, self.batch_size, self.seed = list(lengths), max_tokens, batch_size, seed
        self.epoch = 0
        self._count = len(self._batches(0))

    def _batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        order.sort(key=self.lengths.__getitem__)  # stable: equal lengths keep the random order
        batches: list[list[int]] = []
        batch: list[int] = []
        longest = 0
        for i in order:
            n = max(longest, self.lengths[i])
            if batch and (n * (len(batch) + 1) > self.max_tokens or len(batch) == self.batch_size):
                batches.append(batch)
                batch, n = [], self.lengths[i]
            batch.append(i)
            longest = n
        if batch:
            batches.append(batch)
        perm = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[k] for k in perm]

    def __iter__(self) -> Any:
        batches = self._batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return self._count


def learning_rate_schedule(optimizer: Any, name: str, warmup_steps: int, total_steps: int, processes: int = 1) -> Any:
    """The ``--lr-scheduler`` ``name`` of ``optimizer``: linear warm-up over ``warmup_steps``, then linear decay
    to 0 at ``total_steps``, ``inverse_sqrt`` decay (lr * sqrt(warmup / step)) or a constant rate.

    accelerate steps a prepared scheduler once per process at every optimizer step: the step counts are
    multiplied by ``processes``."""
    from transformers import get_scheduler

    if name not in LR_SCHEDULERS:
        raise ValueError(f"lr scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {name!r}")
    if name == "inverse_sqrt" and warmup_steps <= 0:
        raise ValueError("the inverse_sqrt schedule needs warmup_steps > 0")
    hf_name = {"constant": "constant_with_warmup"}.get(name, name)
    return get_scheduler(hf_name, optimizer, num_warmup_steps=warmup_steps * processes,
                         num_training_steps=total_steps * processes)


def example_lengths(dataset: Any) -> list[int]:
    """Tokens of each tokenized example: its input, or its target when longer (seq2seq)."""
    sources = [len(x) for x in dataset["input_ids"]]
    if "labels" in dataset.column_names and isinstance(dataset[0]["labels"], list):
        return [max(a, len(b)) for a, b in zip(sources, dataset["labels"])]
    return sources


def training_loss(outputs: Any, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The model's loss, or the label-smoothed cross-entropy of its logits (positions labelled -100 left out)."""
    if label_smoothing == 0.0:
        return outputs.loss
    logits = outputs.logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100, label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------- model


def tiny_config(args: argparse.Namespace, tokenizer: Any, num_labels: int | None) -> Any:
    """The config of a small model of ``--arch`` with the tokenizer's vocabulary and special ids."""
    from transformers import BertConfig, RobertaConfig

    ids = {
        "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    labels = {"num_labels": num_labels} if num_labels else {}
    d, layers, heads, ffn = args.d_model, args.layers, args.heads, args.ffn_dim
    attention_dropout = args.dropout if args.attention_dropout is None else args.attention_dropout
    if args.arch in ("bert", "roberta"):
        config_class = BertConfig if args.arch == "bert" else RobertaConfig
        return config_class(
            **ids, **labels, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=args.max_positions + tokenizer.pad_token_id + 2,
            hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=attention_dropout,
        )
    config_class = hf_models.SPARSE_FAMILIES[args.arch]["config"]
    specs = dict(args.roles)
    if args.arch == "t5":
        return config_class(
            **ids, **labels, **specs, d_model=d, d_kv=d // heads, d_ff=ffn, num_layers=layers,
            num_decoder_layers=layers, num_heads=heads, dropout_rate=args.dropout,
            decoder_start_token_id=tokenizer.bos_token_id,
        )
    return config_class(
        **ids, **labels, **specs, d_model=d, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        max_position_embeddings=args.max_positions, dropout=args.dropout, attention_dropout=attention_dropout,
        decoder_start_token_id=tokenizer.bos_token_id, forced_eos_token_id=None, scale_embedding=True,
        init_std=args.init_std if args.init_std is not None else d ** -0.5,
    )


def sparsifies(args: argparse.Namespace) -> bool:
    """Whether ``--attn`` goes through ``hf_models.sparsify`` (learned parameters, a schedule, a Sparse* model)."""
    if not args.attn or args.attn in TRANSFORMERS_IMPLEMENTATIONS:
        return False
    return bool(args.attn_schedule) or hf_models.per_module.learnable_spec(args.attn) is not None or (
        args.from_config and args.arch in hf_models.SPARSE_FAMILIES)


def build_model(args: argparse.Namespace, tokenizer: Any, label2id: dict[str, int] | None) -> Any:
    model = _load_model(args, tokenizer, label2id)
    if sparsifies(args):  # one mechanism per attention module, in place
        hf_models.sparsify(model, args.attn, schedule=args.attn_schedule)
    return model


def _load_model(args: argparse.Namespace, tokenizer: Any, label2id: dict[str, int] | None) -> Any:
    from transformers import (
        AutoConfig,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    task = "seq2seq" if args.task == "seq2seq" else "classification"
    auto = AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModelForSequenceClassification
    extra: dict[str, Any] = {}
    if label2id is not None:
        extra = {"num_labels": len(label2id), "label2id": label2id, "id2label": {i: lab for lab, i in label2id.items()}}
    if args.from_config:
        config = tiny_config(args, tokenizer, len(label2id) if label2id else None)
        if label2id is not None:
            config.label2id, config.id2label = extra["label2id"], extra["id2label"]
        if args.arch in hf_models.SPARSE_FAMILIES:
            return hf_models.sparse_model_class(args.arch, task)(config)
        if args.attn and not sparsifies(args):
            hf_models.compat.set_attn_implementation(config, args.attn)
        return auto.from_config(config)
    stored = AutoConfig.from_pretrained(args.model_dir)
    if label2id is not None and stored.num_labels != len(label2id):
        extra["ignore_mismatched_sizes"] = True  # a new classification head for this label set
    if args.roles:
        model_type = stored.model_type
        return hf_models.sparse_model_class(model_type, task).from_pretrained(args.model_dir, **args.roles, **extra)
    if args.attn and not sparsifies(args):
        extra["attn_implementation"] = args.attn
    return auto.from_pretrained(args.model_dir, **extra)


def freeze_fixed_tables(model: Any) -> list[str]:
    """Mark sinusoidal position tables (Marian, Pegasus) as not trainable; the names frozen.

    transformers builds them frozen, but ``from_pretrained`` (5.23) returns them with
    ``requires_grad=True``: training would change tables that ``save_pretrained`` leaves out, and
    DDP stops on parameters that never get a gradient. The ``Sparse*`` classes freeze them
    themselves; this covers stock models (``--attn``).
    """
    from hf_models.positions import freeze_position_tables

    return freeze_position_tables(model)


def describe_attention(model: Any) -> dict[str, str]:
    config = model.config
    if isinstance(config, hf_models.SparseAttentionConfigMixin):
        described = {field: getattr(config, field) for field in hf_models.SPEC_FIELDS}
        described |= {f: getattr(config, f) for f in hf_models.SCHEDULE_FIELDS if getattr(config, f, None)}
        return described
    described = {"attn_implementation": str(hf_models.compat.attn_implementation(config))}
    setting = getattr(config, hf_models.SPARSIFY_FIELD, None)
    if setting is not None:
        described[hf_models.SPARSIFY_FIELD] = setting
    return described


def align_special_tokens(model: Any, tokenizer: Any) -> None:
    """Give a model the special ids of a tokenizer built from the data (and a matching vocabulary)."""
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
        # Shrinking leaves BART/Marian's final_logits_bias a slice of the old buffer, strides (old_vocab, 1);
        # DDP's buffer broadcast (gloo) refuses to write into it: give buffers standard strides.
        for module in model.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.stride() != buf.new_empty(buf.shape).stride():
                    persistent = name not in module._non_persistent_buffers_set
                    module.register_buffer(name, buf.clone(memory_format=torch.contiguous_format),
                                           persistent=persistent)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, name, getattr(tokenizer, name))
    if model.config.is_encoder_decoder:
        model.config.decoder_start_token_id = tokenizer.bos_token_id
        model.generation_config.decoder_start_token_id = tokenizer.bos_token_id


# ----------------------------------------------------------------------------- training


def parameter_groups(model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """AdamW's parameter groups: weights with decay, biases and norms without; with ``--attention-lr``,
    the attention mechanisms' own parameters (a learned alpha) in a third group at that rate, without
    decay (without the flag they train like any weight)."""
    mechanism_params: set[int] = set()
    if args.attention_lr is not None:
        mechanism_params = {id(p) for m in model.modules() if isinstance(m, plugin.AttentionMechanism)
                            for p in m.parameters()}
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm")
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in mechanism_params]
    groups = [
        {"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    mechanisms = [p for p in model.parameters() if id(p) in mechanism_params]
    if mechanisms:
        groups.append({"params": mechanisms, "weight_decay": 0.0, "lr": args.attention_lr})
    return [g for g in groups if g["params"]]


def quiet_library_progress_bars() -> None:
    """Without a terminal, turn off the progress bars of datasets, transformers and huggingface_hub
    (loading, tokenizing, saving): their carriage-return updates would fill logs and pipes."""
    if sys.stderr.isatty():
        return
    import datasets
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


class Progress:
    """Training progress: a tqdm bar on a terminal; elsewhere (logs, pipes) plain lines without carriage
    returns: step, running loss, elapsed seconds, about every tenth of the steps (``PROGRESS_LINES``)
    and at least every ``PROGRESS_SECONDS``, and at the last step."""

    def __init__(self, total: int, enabled: bool = True, stream: Any = None) -> None:
        self.total, self.enabled, self.step = max(total, 1), enabled, 0
        self.stream = stream if stream is not None else sys.stderr
        self.bar = tqdm(total=total, desc="training", file=self.stream) if enabled and self.stream.isatty() else None
        self.every = max(1, math.ceil(self.total / PROGRESS_LINES))
        self.start = self.last = time.monotonic()

    def update(self, loss: float) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")
            return
        now = time.monotonic()
        if not self.enabled or not (self.step % self.every == 0 or self.step == self.total
                                    or now - self.last >= PROGRESS_SECONDS):
            return
        self.last = now
        print(f"training: step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%), loss {loss:.4f}, "
              f"{now - self.start:.1f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    check_launch()
    torch.set_num_threads(choose_threads(args.threads))
    start = time.time()
    use_cpu = args.cpu or not torch.cuda.is_available()  # cpu=True also lets accelerate run multi-process (gloo)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if args.find_unused_parameters else []
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision, cpu=use_cpu,
        kwargs_handlers=handlers,
    )
    set_seed(args.seed)
    out_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    quiet_library_progress_bars()
    with accelerator.main_process_first():
        raw = load_splits(args, cache_dir=str(out_dir / ".datasets_cache"))

    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
    )

    seq2seq = args.task == "seq2seq"
    label2id = None
    if not seq2seq:
        labels = sorted({str(x) for x in raw["train"][args.label_column]})
        label2id = {lab: i for i, lab in enumerate(labels)}
    built_tokenizer = not has_tokenizer(args.model_dir)
    if built_tokenizer:
        cols = [args.source_column, args.target_column] if seq2seq else [args.text_column]
        texts = [str(t) for c in cols for t in raw["train"][c]]
        tokenizer = build_tokenizer(texts, args.task, args.tokenizer or "unigram", args.vocab_size)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)

    model = build_model(args, tokenizer, label2id)
    if built_tokenizer and args.model_dir:
        align_special_tokens(model, tokenizer)
    freeze_fixed_tables(model)

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        if seq2seq:
            enc = tokenizer([str(s) for s in batch[args.source_column]], max_length=args.max_source_length,
                            truncation=True)
            enc["labels"] = tokenizer(text_target=[str(t) for t in batch[args.target_column]],
                                      max_length=args.max_target_length, truncation=True)["input_ids"]
        else:
            enc = tokenizer([str(s) for s in batch[args.text_column]], max_length=args.max_source_length,
                            truncation=True)
            enc["labels"] = [label2id[str(x)] for x in batch[args.label_column]]
        return enc

    with accelerator.main_process_first():
        data = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")
    for split in data:  # evaluated splits keep their row numbers: predictions are scored against the file's texts
        if split != "train":
            data[split] = data[split].add_column("example_index", list(range(len(data[split]))))
    if seq2seq:
        collate = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    else:
        collate = DataCollatorWithPadding(tokenizer)
    if args.max_tokens:
        sampler = LengthBatchSampler(example_lengths(data["train"]), args.max_tokens, args.batch_size, args.seed)
        train_dl = DataLoader(data["train"], batch_sampler=sampler, collate_fn=collate)
    else:
        train_dl = DataLoader(data["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    valid_dl = DataLoader(data["validation"], batch_size=args.eval_batch_size, shuffle=False, collate_fn=collate)

    groups = parameter_groups(model, args)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    steps_per_epoch = math.ceil(len(train_dl) / accelerator.num_processes / args.grad_accum)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    epochs = math.ceil(total_steps / max(steps_per_epoch, 1))
    scheduler = learning_rate_schedule(optimizer, args.lr_scheduler, args.warmup_steps, total_steps,
                                       accelerator.num_processes)
    model, optimizer, train_dl, valid_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, valid_dl,
                                                                          scheduler)
    test_dl = None
    if "test" in data:
        test_dl = accelerator.prepare(DataLoader(data["test"], batch_size=args.eval_batch_size, shuffle=False,
                                                 collate_fn=collate))

    progress = Progress(total_steps, enabled=accelerator.is_local_main_process)
    steps, examples, loss_sum, loss_count = 0, 0, 0.0, 0
    history = []
    metrics: dict[str, Any] = {}
    # the learned / scheduled attention parameters along the run: after `step` updates, the values the next
    # update uses (a schedule at that step, learned alphas as trained so far)
    attention_log: list[dict[str, Any]] = []

    def log_attention() -> None:
        if args.log_attention_every != 0 and (not attention_log or attention_log[-1]["step"] != steps):
            values = hf_models.attention_parameter_values(accelerator.unwrap_model(model), step=steps)
            if values:
                attention_log.append({"step": steps, "values": values})

    predictions: dict[str, list[dict[str, Any]]] = {}
    for epoch in range(epochs):
        model.train()
        for batch in train_dl:
            plugin.set_schedule_step(model, steps)  # attention schedules: optimizer updates done so far
            if args.log_attention_every and steps % args.log_attention_every == 0:
                log_attention()
            with accelerator.accumulate(model):
                loss = training_loss(model(**batch), batch["labels"], args.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            examples += batch["labels"].shape[0]
            loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
            if accelerator.sync_gradients:
                steps += 1
                progress.update(loss_sum / loss_count)
                if steps >= total_steps:
                    break
        if args.eval_every_epoch or steps >= total_steps or epoch == epochs - 1:
            metrics = evaluate(model, valid_dl, tokenizer, accelerator, args, raw["validation"])
            predictions["valid"] = metrics.pop("predictions")
            if args.log_attention_every is None:
                log_attention()
            history.append({"epoch": epoch + 1, "step": steps,
                            **{k: v for k, v in metrics.items() if k not in ("examples", "mechanisms_seen")}})
            accelerator.print(json.dumps({"epoch": epoch + 1, "step": steps, **metrics}))
        if steps >= total_steps:
            break
    progress.close()
    if args.log_attention_every:
        log_attention()  # after the last update
    if test_dl is not None:  # once, with the final model
        test_metrics = evaluate(model, test_dl, tokenizer, accelerator, args, raw["test"], split="test")
        predictions["test"] = test_metrics.pop("predictions")
        accelerator.print(json.dumps({"step": steps, **test_metrics}))
        metrics.update(test_metrics)
    if args.predictions_file and accelerator.is_main_process:
        write_predictions(args.predictions_file, predictions)

    # per-process counts, gathered: evidence that every process trained
    counts = accelerator.gather(torch.tensor([[steps, examples]], device=accelerator.device)).tolist()
    train_loss = accelerator.gather(torch.tensor([loss_sum / max(loss_count, 1)], device=accelerator.device))

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(out_dir, is_main_process=accelerator.is_main_process,
                              state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(out_dir)
    if args.save_state:
        accelerator.save_state(str(out_dir / "accelerate_state"))

    result = {
        "task": args.task,
        "model_type": unwrapped.config.model_type,
        "attention": describe_attention(unwrapped),
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "mixed_precision": accelerator.mixed_precision,
        "epochs": epoch + 1,
        "steps": steps,
        "steps_per_process": [c[0] for c in counts],
        "train_examples_per_process": [c[1] for c in counts],
        "train_loss": float(train_loss.mean()),
        **metrics,
        "history": history,
        **({"attention_parameters": attention_log} if args.log_attention_every != 0 else {}),
        "output_dir": str(out_dir),
        "seconds": round(time.time() - start, 2),
    }
    if accelerator.is_main_process:
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result), flush=True)
    accelerator.end_training()
    return result


@torch.no_grad()
def evaluate(model: Any, dl: DataLoader, tokenizer: Any, accelerator: Accelerator, args: argparse.Namespace,
             raw_split: Any, split: str = "valid") -> dict[str, Any]:
    """Loss; accuracy (classification) or BLEU, chrF and exact match of ``generate()`` (seq2seq).

    Predictions are scored against the texts of ``raw_split`` (the data file's strings, matched by
    the ``example_index`` of each batch), never against text decoded from the label ids: a
    tokenizer that cannot spell a reference word then costs the score it should. ``split``
    ``"valid"`` keeps the names ``valid_loss``, ``bleu``, ``chrf``, ...; ``"test"`` names them
    ``test_loss``, ``test_bleu``, ``test_chrf``, ... The result's ``"predictions"`` lists source,
    prediction and reference of every example in file order.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be one of valid, test, got {split!r}")
    model.eval()
    seq2seq = args.task == "seq2seq"
    losses, indices, outputs_text = [], [], []
    unk_counts = []
    unk_id = getattr(tokenizer, "unk_token_id", None)
    unwrapped = accelerator.unwrap_model(model)
    id2label = unwrapped.config.id2label
    with plugin.record_calls() as calls:
        for batch in dl:
            index = batch.pop("example_index")
            outputs = model(**batch)
            losses.append(accelerator.gather_for_metrics(outputs.loss.detach().repeat(batch["labels"].shape[0])))
            if not seq2seq:
                preds, index = accelerator.gather_for_metrics((outputs.logits.argmax(-1), index))
                outputs_text += [str(id2label[int(p)]) for p in preds]
                indices += index.tolist()
                continue
            labels = batch["labels"]
            counts = torch.stack([(labels == unk_id).sum(1) if unk_id is not None else labels.new_zeros(len(labels)),
                                  ((labels != -100) & (labels != tokenizer.eos_token_id)).sum(1)], 1)
            generated = unwrapped.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=False,
            )
            generated = accelerator.pad_across_processes(generated, dim=1, pad_index=tokenizer.pad_token_id)
            generated, index, counts = accelerator.gather_for_metrics((generated, index, counts))
            outputs_text += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
            indices += index.tolist()
            unk_counts.append(counts)
    model.train()
    if sorted(indices) != list(range(len(raw_split))):
        raise RuntimeError(f"evaluation of {split}: {len(indices)} predictions for {len(raw_split)} examples")
    order = sorted(range(len(indices)), key=indices.__getitem__)
    src_col, ref_col = (args.source_column, args.target_column) if seq2seq else (args.text_column, args.label_column)
    sources = [str(x) for x in raw_split[src_col]]
    references = [str(x).strip() for x in raw_split[ref_col]]
    rows = [{"source": sources[indices[k]], "prediction": outputs_text[k], "reference": references[indices[k]]}
            for k in order]

    def name(key: str) -> str:
        return key if split == "valid" else f"test_{key}"

    result: dict[str, Any] = {f"{split}_loss": float(torch.cat(losses).mean()) if losses else float("nan")}
    if split == "valid":
        result["mechanisms_seen"] = sorted({f"{c.role}:{c.spec}" for c in calls})
    if seq2seq:
        result.update({name(k): v for k, v in text_metrics([r["prediction"] for r in rows], references).items()})
        counts = torch.cat(unk_counts).sum(0) if unk_counts else torch.zeros(2)
        result[name("target_unk_rate")] = float(counts[0]) / max(float(counts[1]), 1.0)
    else:
        result[name("accuracy")] = sum(r["prediction"] == r["reference"] for r in rows) / max(len(rows), 1)
    result[f"{split}_examples"] = len(rows)
    if split == "valid" and seq2seq:
        result["examples"] = rows[:3]
    result["predictions"] = rows
    return result


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """sacreBLEU (its default 13a tokenization of the detokenized text), chrF (character 6-grams, word
    bigrams off: chrF, not chrF++) and exact match after stripping, of ``predictions`` against one
    reference each; with the signatures of BLEU and chrF."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(predictions) != len(references):
        raise ValueError(f"predictions and references must have the same length, got {len(predictions)} "
                         f"and {len(references)}")
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    bleu, chrf = BLEU(), CHRF()
    return {
        "bleu": bleu.corpus_score(preds, [refs]).score if preds else 0.0,
        "chrf": chrf.corpus_score(preds, [refs]).score if preds else 0.0,
        "exact_match": sum(p == r for p, r in zip(preds, refs)) / max(len(refs), 1),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def write_predictions(path: str | Path, predictions: dict[str, list[dict[str, Any]]]) -> None:
    """One json object per line: ``split``, ``source``, ``prediction``, ``reference``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for split, rows in predictions.items():
            for row in rows:
                fh.write(json.dumps({"split": split, **row}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
