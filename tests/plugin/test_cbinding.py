"""The typed binding table of the C kernels: every argument is checked before a pointer is passed."""

import re

import pytest
import torch

from plugin.kernels import chunked
from plugin.kernels import cpu as cpu_kernels
from plugin.kernels.cbinding import Arg, CFunction

pytestmark = pytest.mark.skipif(not chunked.c_kernel_available(), reason="no C compiler for the kernels")


def _forward_args(**changes):
    rows, n = 3, 5
    args = {
        "S": torch.randn(rows, n), "rows": rows, "n": n, "am1": torch.ones(1), "heads": 1, "kind": 0, "causal": 0,
        "q_start": 0, "c": 1, "causal_off": 0, "stats": torch.empty(rows, 3), "counts": None, "nthreads": 1,
    }
    args.update(changes)
    return args


def test_a_correct_call_runs_and_fills_its_outputs():
    args = _forward_args()
    assert chunked.ENTMAX_ROWS.call("entmax_rows_forward", **args) == 0
    torch.testing.assert_close(args["S"].sum(-1), torch.ones(3))


@pytest.mark.parametrize("name, value, message", [
    ("S", torch.randn(3, 5, dtype=torch.float64), "S of entmax_rows_forward: must be a contiguous CPU tensor of "
                                                  "torch.float32, got torch.float64"),
    ("S", torch.randn(5, 3).t(), "S of entmax_rows_forward: .* \\(not contiguous\\)"),
    ("S", torch.randn(2, 5), "S of entmax_rows_forward: must hold at least 15 elements, got 10"),
    ("stats", torch.empty(3, 2), "stats of entmax_rows_forward: must hold at least 9 elements"),
    ("counts", torch.empty(3), "counts of entmax_rows_forward: .*torch.int32, got torch.float32"),
    ("counts", torch.empty(2, dtype=torch.int32), "counts of entmax_rows_forward: must hold at least 3"),
    ("am1", None, "am1 of entmax_rows_forward: a tensor is required, got None"),
    ("am1", [1.0], "am1 of entmax_rows_forward: must be a tensor, got list"),
    ("c", 0, "argument c must be >= 1, got 0"),
    ("heads", 2, "am1 of entmax_rows_forward: must hold at least 2 elements, got 1"),
    ("rows", 3.0, "argument rows must be a Python int, got 3.0"),
    ("causal", True, "argument causal must be a Python int, got True"),
])
def test_a_wrong_argument_raises_before_any_pointer_is_passed(name, value, message):
    args = _forward_args(**{name: value})
    before = args["S"].clone() if isinstance(args["S"], torch.Tensor) else None
    with pytest.raises(ValueError, match=message):
        chunked.ENTMAX_ROWS.call("entmax_rows_forward", **args)
    if before is not None:
        assert torch.equal(args["S"], before)  # nothing ran


def test_a_missing_or_unknown_argument_is_named():
    args = _forward_args()
    del args["stats"]
    with pytest.raises(ValueError, match="missing stats"):
        chunked.ENTMAX_ROWS.call("entmax_rows_forward", **args)
    with pytest.raises(ValueError, match="unknown scores"):
        chunked.ENTMAX_ROWS.call("entmax_rows_forward", **_forward_args(), scores=torch.zeros(1))
    with pytest.raises(ValueError, match="declares no function 'entmax_rows_forwards'"):
        chunked.ENTMAX_ROWS.call("entmax_rows_forwards", **_forward_args())


def test_a_tensor_on_another_device_is_refused():
    with pytest.raises(ValueError, match="contiguous CPU tensor of torch.float32, got torch.float32 on meta"):
        chunked.ENTMAX_ROWS.call("entmax_rows_forward", **_forward_args(S=torch.empty(3, 5, device="meta")))


def test_the_structured_kernels_are_checked_too():
    x = torch.randn(2, 4)
    args = {"kind": 0, "x": x, "allowed": None, "out": torch.empty(2, 4), "group": torch.empty(2, 4),
            "rows": 2, "d": 4, "lam": 0.5, "flags": 0, "threads": 1}
    with pytest.raises(ValueError, match="group of structured_prox_f32: .*torch.int32, got torch.float32"):
        cpu_kernels.LIBRARY.call("structured_prox_f32", **args)
    args["group"] = torch.empty(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="x of structured_prox_f64: .*torch.float64, got torch.float32"):
        cpu_kernels.LIBRARY.call("structured_prox_f64", **args)
    assert cpu_kernels.LIBRARY.call("structured_prox_f32", **args) == 0


_C_KINDS = {"float *": "f32", "double *": "f64", "int32_t *": "i32", "int64_t *": "i64", "uint8_t *": "u8",
            "int64_t": "int64", "int": "int", "double": "double"}


def _c_parameters(source: str, name: str) -> list[tuple[str, str]]:
    """(kind, name) of each parameter of the C function ``name`` as the source defines it."""
    text = source.replace("\\\n", " ")
    stem, suffix = name.rsplit("_", 1) if name.endswith(("_f32", "_f64")) else (name, None)
    pattern = rf"\b{re.escape(stem)}_##SUFFIX\s*\(([^)]*)\)" if suffix else rf"^\w+\s+{re.escape(name)}\(([^)]*)\)"
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, f"{name} is not defined in the source"
    params = []
    for param in " ".join(match.group(1).split()).split(","):
        param = param.strip().removeprefix("const ")
        if suffix:
            param = re.sub(r"^T\b", "float" if suffix == "f32" else "double", param)
        ctype, pname = param.rsplit("*", 1) if "*" in param else param.rsplit(" ", 1)
        ctype = ctype.strip() + (" *" if "*" in param else "")
        params.append((_C_KINDS[ctype], pname.strip()))
    return params


def test_the_table_declares_each_c_function_as_its_source_defines_it():
    for library in (chunked.ENTMAX_ROWS, cpu_kernels.LIBRARY):
        source = library.source.read_text()
        lib = library.load()
        for fn in library.functions.values():
            assert getattr(lib, fn.name) is not None
            assert [(a.kind, a.name) for a in fn.args] == _c_parameters(source, fn.name), fn.name


def test_an_argument_kind_outside_the_table_is_refused():
    with pytest.raises(ValueError, match="kind must be one of f32, f64, i32, i64, u8, int64, int, double"):
        CFunction("f", (Arg("x", "float32"),))
