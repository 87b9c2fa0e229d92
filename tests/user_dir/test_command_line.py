"""fairseq's command-line tools with --user-dir user_dir: train, generate, interactive, validate,
resume, weights-only checkpoints, from_pretrained, argument errors."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

import plugin

from .helpers import (
    BIN,
    NO_DROPOUT,
    TINY_DIMS,
    USER_DIR,
    generate_argv,
    parse_generate_output,
    run_cli,
    train_argv,
)

N_TEST = 8  # sentences in the test split (helpers.write_corpus)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(tool: str, argv: list[str]) -> str:
    """Run .venv/bin/fairseq-<tool> as a user does; return its stdout."""
    proc = subprocess.run(
        [str(BIN / f"fairseq-{tool}"), *argv],
        check=False,
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ----------------------------------------------------------------------------- a user's run, as subprocesses

USER_RUN = ("sparsemax", "entmax:alpha=learned", "sparsemax:gamma=0.5")


@pytest.fixture(scope="module")
def user_run(data_bin, tmp_path_factory):
    """fairseq-train as a subprocess: 3 updates of 2 batches each, validation with BLEU."""
    save = tmp_path_factory.mktemp("user-run")
    enc, dec, cross = USER_RUN
    _run(
        "train",
        train_argv(
            data_bin,
            save,
            "--encoder-attn",
            enc,
            "--decoder-attn",
            dec,
            "--cross-attn",
            cross,
            "--max-update",
            "3",
            "--update-freq",
            "2",
            "--eval-bleu",
            "--eval-bleu-args",
            '{"beam": 2}',
            "--best-checkpoint-metric",
            "bleu",
            "--maximize-best-checkpoint-metric",
        ),
    )
    return save


def test_train_then_generate_with_print_alignment(user_run, data_bin):
    out = _run("generate", generate_argv(data_bin, user_run / "checkpoint_best.pt", "--print-alignment", "soft"))
    lines = parse_generate_output(out)
    assert len(lines["H"]) == N_TEST
    # soft alignments are the cross-attention weights averaged over heads: sparsemax leaves exact
    # zeros (softmax weights over a few keys would be far above the printed 1e-6 resolution)
    weights = [float(w) for row in lines["A"].values() for col in row.split() for w in col.split(",")]
    assert min(weights) == 0.0 and max(weights) <= 1.0


def test_checkpoint_holds_the_specs_and_the_trained_alpha(user_run):
    from user_dir.checkpoint_globals import allow_fairseq_checkpoint_globals

    # importing user_dir did this once; a transformers Trainer resume earlier in the same test process
    # (torch's safe_globals context) removes numpy's globals again, so re-apply it as a user would
    allow_fairseq_checkpoint_globals()
    state = torch.load(user_run / "checkpoint_last.pt")  # torch's default: weights_only=True
    args = state["cfg"]["model"]
    assert (args.encoder_attn, args.decoder_attn, args.cross_attn) == USER_RUN
    alphas = {k: v for k, v in state["model"].items() if k.endswith("mechanism.normalizer.learned.weight")}
    assert sorted(alphas) == [f"decoder.layers.{i}.self_attn.mechanism.normalizer.learned.weight" for i in (0, 1)]
    initial = plugin.LearnableAlpha(4).weight  # alpha = 1.5 at the start
    assert all(not torch.equal(v, initial) for v in alphas.values())  # trained


def test_weights_only_load_of_fairseq_checkpoints(user_run):
    """checkpoint_utils.load_checkpoint_to_cpu under torch's weights_only=True default."""
    from fairseq import checkpoint_utils

    from user_dir.checkpoint_globals import fairseq_checkpoint_globals

    allowed = {
        f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in fairseq_checkpoint_globals()
    }
    paths = [str(user_run / name) for name in ("checkpoint_best.pt", "checkpoint_last.pt")]
    # the globals a checkpoint needs beyond torch's defaults (with our allow-list removed for a moment)
    ours = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        needed = [set(torch.serialization.get_unsafe_globals_in_checkpoint(p)) for p in paths]
    finally:
        torch.serialization.add_safe_globals(ours)
    for found in needed:
        # --eval-bleu stores numpy arrays in the metrics: the allow-list is needed and sufficient
        assert {"argparse.Namespace", "numpy.ndarray"} <= found <= allowed
    for path in paths:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
        assert state["cfg"].model.arch == "sparse_transformer_tiny"


def test_from_pretrained_translates(user_run, data_bin):
    from fairseq.models.transformer import TransformerModel

    from user_dir.models.sparse_transformer import SparseTransformerModel

    hub = TransformerModel.from_pretrained(
        str(user_run), checkpoint_file="checkpoint_last.pt", data_name_or_path=str(data_bin), user_dir=str(USER_DIR)
    )
    model = hub.models[0]
    assert isinstance(model, SparseTransformerModel)
    roles = {m.role: m.spec for m in model.modules() if hasattr(m, "mechanism")}
    assert roles == dict(zip(("encoder", "decoder", "cross"), USER_RUN))
    with plugin.record_calls() as calls:
        out = hub.translate("s1 s2 s3", beam=2, max_len_b=15)
    assert isinstance(out, str) and out
    assert {(c.role, c.spec, c.training) for c in calls} == {(r, s, False) for r, s in roles.items()}


# ----------------------------------------------------------------------------- in-process runs, recorded

RECORDED = [
    pytest.param(("entmax15", "sparsemax", "entmax:alpha=learned"), id="entmax15/sparsemax/learned"),
    pytest.param(("oscarmax:lam=0.1", "entmax15", "fusedmax:lam=0.5"), id="oscarmax/entmax15/fusedmax"),
    pytest.param(("entmax:alpha=1.3", "sparsemax", "continuous_softmax"), id="entmax1.3/sparsemax/continuous"),
    pytest.param(("sparsemax", "entmax15", "sparsemax+continuous_sparsemax"), id="sparsemax/entmax15/sparse+cont"),
]


@pytest.mark.parametrize("specs", RECORDED)
def test_requested_mechanisms_run_in_training_and_generation(specs, data_bin, tmp_path):
    specs = tuple(plugin.canonical_spec(s) for s in specs)
    enc, dec, cross = specs
    roles = dict(zip(("encoder", "decoder", "cross"), specs))
    with plugin.record_calls() as calls:
        run_cli(
            "train",
            train_argv(
                data_bin,
                tmp_path,
                "--encoder-attn",
                enc,
                "--decoder-attn",
                dec,
                "--cross-attn",
                cross,
                "--max-update",
                "2",
                "--disable-validation",
            ),
        )
    assert {(c.role, c.spec, c.training) for c in calls} == {(r, s, True) for r, s in roles.items()}

    results = tmp_path / "results"
    with plugin.record_calls() as calls:
        run_cli(
            "generate",
            generate_argv(
                data_bin, tmp_path / "checkpoint_last.pt", "--results-path", str(results), "--print-alignment", "soft"
            ),
        )
    assert {(c.role, c.spec, c.training) for c in calls} == {(r, s, False) for r, s in roles.items()}
    assert {c.query_shape[2] for c in calls if c.role == "decoder"} == {1}  # incremental decoding
    lines = parse_generate_output((results / "generate-test.txt").read_text())
    assert len(lines["H"]) == len(lines["A"]) == N_TEST


def test_validate_and_interactive_use_the_mechanisms(data_bin, tmp_path, capsys):
    specs = ("entmax:alpha=1.3", "entmax15", "sparsemax")
    roles = dict(zip(("encoder", "decoder", "cross"), specs))
    run_cli(
        "train",
        train_argv(
            data_bin,
            tmp_path,
            "--encoder-attn",
            specs[0],
            "--decoder-attn",
            specs[1],
            "--cross-attn",
            specs[2],
            "--max-update",
            "1",
            "--disable-validation",
        ),
    )
    checkpoint = str(tmp_path / "checkpoint_last.pt")
    with plugin.record_calls() as calls:
        # fairseq-validate needs --task and a batch size given explicitly (it re-parses without defaults)
        run_cli(
            "validate",
            [
                str(data_bin),
                "--user-dir",
                str(USER_DIR),
                "--path",
                checkpoint,
                "--cpu",
                "--task",
                "translation",
                "--valid-subset",
                "valid",
                "--max-tokens",
                "500",
            ],
        )
    assert {(c.role, c.spec, c.training) for c in calls} == {(r, s, False) for r, s in roles.items()}

    source = tmp_path / "input.txt"
    source.write_text("s1 s2 s3\ns4 s5\n")
    capsys.readouterr()
    with plugin.record_calls() as calls:
        run_cli(
            "interactive",
            [
                str(data_bin),
                "--user-dir",
                str(USER_DIR),
                "--path",
                checkpoint,
                "--cpu",
                "--input",
                str(source),
                "--beam",
                "2",
                "--max-len-b",
                "15",
                "--source-lang",
                "src",
                "--target-lang",
                "tgt",
            ],
        )
    assert {(c.role, c.spec) for c in calls} == set(roles.items())
    out = capsys.readouterr().out
    assert sum(line.startswith("H-") for line in out.splitlines()) == 2


def test_resume_continues_exactly(data_bin, tmp_path):
    """4 updates straight == 2 updates, then --restore-file and 2 more (dropout on, learned alpha)."""
    common = [
        "--encoder-attn",
        "sparsemax",
        "--decoder-attn",
        "entmax:alpha=learned",
        "--cross-attn",
        "entmax15",
        "--dropout",
        "0.1",
        "--attention-dropout",
        "0.1",
        "--disable-validation",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", train_argv(data_bin, straight, *common, "--max-update", "4"))
    run_cli("train", train_argv(data_bin, resumed, *common, "--max-update", "2"))
    halfway = torch.load(resumed / "checkpoint_last.pt")["model"]
    run_cli(
        "train",
        train_argv(
            data_bin, resumed, *common, "--max-update", "4", "--restore-file", str(resumed / "checkpoint_last.pt")
        ),
    )
    a = torch.load(straight / "checkpoint_last.pt")
    b = torch.load(resumed / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 4
    assert list(a["model"]) == list(b["model"])
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    alpha = "decoder.layers.0.self_attn.mechanism.normalizer.learned.weight"
    assert not torch.equal(halfway[alpha], b["model"][alpha])  # alpha kept training after the restore
    state_a, state_b = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    for key in state_a:
        for slot in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state_b[key][slot], state_a[key][slot], rtol=0, atol=0)


def test_a_stock_checkpoint_is_fine_tuned_with_sparse_attention(data_bin, tmp_path):
    """Train fairseq's own transformer, then restore it into sparse_transformer (alpha starts at 1.5)."""
    stock, sparse = tmp_path / "stock", tmp_path / "sparse"
    run_cli(
        "train",
        train_argv(
            data_bin, stock, *TINY_DIMS, *NO_DROPOUT, "--max-update", "1", "--disable-validation", arch="transformer"
        ),
    )
    with plugin.record_calls() as calls:
        run_cli(
            "train",
            train_argv(
                data_bin,
                sparse,
                *NO_DROPOUT,
                "--cross-attn",
                "entmax:alpha=learned",
                "--max-update",
                "1",
                "--disable-validation",
                "--restore-file",
                str(stock / "checkpoint_last.pt"),
                "--reset-optimizer",
                "--reset-lr-scheduler",
                "--reset-dataloader",
                "--reset-meters",
            ),
        )
    assert {(c.role, c.spec) for c in calls} == {
        ("encoder", "softmax"),
        ("decoder", "softmax"),
        ("cross", "entmax:alpha=learned"),
    }
    before = torch.load(stock / "checkpoint_last.pt")["model"]
    after = torch.load(sparse / "checkpoint_last.pt")["model"]
    assert set(after) - set(before) == {
        f"decoder.layers.{i}.encoder_attn.mechanism.normalizer.learned.weight" for i in (0, 1)
    }


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("flag", ["--encoder-attn", "--decoder-attn", "--cross-attn"])
def test_unknown_spec_fails_at_argument_parsing(flag, data_bin, capsys):
    from fairseq import options

    parser = options.get_training_parser()
    with pytest.raises(SystemExit) as exit_info:
        options.parse_args_and_arch(
            parser,
            input_args=[
                str(data_bin),
                "--user-dir",
                str(USER_DIR),
                "--arch",
                "sparse_transformer_tiny",
                flag,
                "nosuchmax",
            ],
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "'nosuchmax'" in err
    for name in plugin.variants():
        assert name in err


def test_bad_parameter_fails_at_argument_parsing_with_its_range(data_bin, capsys):
    from fairseq import options

    parser = options.get_training_parser()
    with pytest.raises(SystemExit):
        options.parse_args_and_arch(
            parser,
            input_args=[
                str(data_bin),
                "--user-dir",
                str(USER_DIR),
                "--arch",
                "sparse_transformer_tiny",
                "--decoder-attn",
                "entmax:alpha=3",
            ],
        )
    err = capsys.readouterr().err
    assert "argument --decoder-attn" in err and "alpha" in err and "[1, 2]" in err


def test_architectures_keep_fairseq_defaults(data_bin):
    from fairseq import options

    def parsed(arch):
        parser = options.get_training_parser()
        return vars(
            options.parse_args_and_arch(parser, input_args=[str(data_bin), "--user-dir", str(USER_DIR), "--arch", arch])
        )

    for ours, stock in (
        ("sparse_transformer", "transformer"),
        ("sparse_transformer_iwslt_de_en", "transformer_iwslt_de_en"),
    ):
        a, b = parsed(ours), parsed(stock)
        assert (a["encoder_attn"], a["decoder_attn"], a["cross_attn"]) == ("softmax",) * 3
        for key in (
            "encoder_embed_dim",
            "encoder_ffn_embed_dim",
            "encoder_layers",
            "encoder_attention_heads",
            "decoder_layers",
            "decoder_attention_heads",
            "dropout",
            "share_all_embeddings",
        ):
            assert a.get(key) == b.get(key), key
    tiny = parsed("sparse_transformer_tiny")
    assert (
        tiny["encoder_embed_dim"],
        tiny["encoder_ffn_embed_dim"],
        tiny["encoder_layers"],
        tiny["encoder_attention_heads"],
    ) == (64, 128, 2, 4)


def test_checkpoints_load_after_a_safe_globals_context_removed_the_allow_list(user_run):
    """torch's safe_globals context removes its globals on exit even when they were allowed before
    (transformers' Trainer enters one when it resumes); fairseq checkpoints must still load."""
    import numpy as np
    from fairseq import checkpoint_utils

    reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
    with torch.serialization.safe_globals([reconstruct, np.ndarray, np.dtype]):
        pass
    assert reconstruct not in torch.serialization.get_safe_globals()  # the allow-list really was removed
    state = checkpoint_utils.load_checkpoint_to_cpu(str(user_run / "checkpoint_best.pt"))
    assert "model" in state
