"""Fine-tune a seq2seq model or a classifier with any attention mechanism, with accelerate.

Seq2seq (translation, summarization) with per-role mechanisms, from a local model or a tiny
model built from a config; a word-level tokenizer is built from the data when the model has none:

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

Writes the model (safetensors) and tokenizer to ``--output-dir``, ``metrics.json`` there, and
prints the metrics as the last line of its output (JSON).
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
    args = ap.parse_args(argv)

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
    from datasets import load_dataset

    files = {"train": args.train_file, "validation": args.valid_file}
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


def build_word_tokenizer(texts: list[str], task: str) -> Any:
    """A word-level tokenizer over ``texts`` (whitespace and punctuation split), as a transformers tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIALS.values())
    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    eos, bos = SPECIALS["eos"], SPECIALS["bos"]
    # seq2seq: "x </s>" as Marian/T5 do; classification: "<s> x </s>" (the first token pools)
    single = f"$A {eos}" if task == "seq2seq" else f"{bos} $A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIALS["pad"], bos_token=bos, eos_token=eos, unk_token=SPECIALS["unk"]
    )


def has_tokenizer(model_dir: str | None) -> bool:
    if not model_dir:
        return False
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "source.spm", "vocab.txt")
    return any((Path(model_dir) / n).exists() for n in names)


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

    with accelerator.main_process_first():
        raw = load_splits(args, cache_dir=str(out_dir / ".datasets_cache"))

    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        get_scheduler,
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
        tokenizer = build_word_tokenizer(texts, args.task)
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
    if seq2seq:
        collate = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    else:
        collate = DataCollatorWithPadding(tokenizer)
    train_dl = DataLoader(data["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    valid_dl = DataLoader(data["validation"], batch_size=args.eval_batch_size, shuffle=False, collate_fn=collate)

    groups = parameter_groups(model, args)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    steps_per_epoch = math.ceil(len(train_dl) / accelerator.num_processes / args.grad_accum)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    epochs = math.ceil(total_steps / max(steps_per_epoch, 1))
    # accelerate steps a prepared scheduler once per process per optimizer step
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=args.warmup_steps * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    model, optimizer, train_dl, valid_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, valid_dl,
                                                                          scheduler)

    progress = tqdm(total=total_steps, disable=not accelerator.is_local_main_process, desc="training")
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

    for epoch in range(epochs):
        model.train()
        for batch in train_dl:
            plugin.set_schedule_step(model, steps)  # attention schedules: optimizer updates done so far
            if args.log_attention_every and steps % args.log_attention_every == 0:
                log_attention()
            with accelerator.accumulate(model):
                loss = model(**batch).loss
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
                progress.update(1)
                progress.set_postfix(loss=f"{loss_sum / loss_count:.3f}")
                if steps >= total_steps:
                    break
        if args.eval_every_epoch or steps >= total_steps or epoch == epochs - 1:
            metrics = evaluate(model, valid_dl, tokenizer, accelerator, args)
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
def evaluate(model: Any, valid_dl: DataLoader, tokenizer: Any, accelerator: Accelerator,
             args: argparse.Namespace) -> dict[str, Any]:
    """Validation loss; accuracy (classification) or BLEU and exact match of generate() (seq2seq)."""
    model.eval()
    losses, correct, total = [], 0, 0
    predictions: list[str] = []
    references: list[str] = []
    unwrapped = accelerator.unwrap_model(model)
    with plugin.record_calls() as calls:
        for batch in valid_dl:
            outputs = model(**batch)
            losses.append(accelerator.gather_for_metrics(outputs.loss.detach().repeat(batch["labels"].shape[0])))
            if args.task == "classification":
                preds = outputs.logits.argmax(-1)
                preds, refs = accelerator.gather_for_metrics((preds, batch["labels"]))
                correct += int((preds == refs).sum())
                total += int(refs.numel())
                continue
            generated = unwrapped.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=False,
            )
            generated = accelerator.pad_across_processes(generated, dim=1, pad_index=tokenizer.pad_token_id)
            labels = accelerator.pad_across_processes(batch["labels"], dim=1, pad_index=-100)
            generated, labels = accelerator.gather_for_metrics((generated, labels))
            labels = labels.masked_fill(labels == -100, tokenizer.pad_token_id)
            predictions += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
            references += [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
    model.train()
    result: dict[str, Any] = {"valid_loss": float(torch.cat(losses).mean()) if losses else float("nan")}
    result["mechanisms_seen"] = sorted({f"{c.role}:{c.spec}" for c in calls})
    if args.task == "classification":
        result["accuracy"] = correct / max(total, 1)
        result["valid_examples"] = total
    else:
        import sacrebleu

        result["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score if predictions else 0.0
        result["exact_match"] = sum(p == r for p, r in zip(predictions, references)) / max(len(references), 1)
        result["valid_examples"] = len(references)
        result["examples"] = [{"prediction": p, "reference": r} for p, r in list(zip(predictions, references))[:3]]
    return result


if __name__ == "__main__":
    main()
