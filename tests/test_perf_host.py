"""``python -m perf --host`` runs and counts every kernel a call starts (not a timed test: the
figures are host-dependent; the counts are not)."""

import pytest
import torch

from perf import host


def _rows(names):
    cases = [c for c in host.CASES if c.name in names]
    assert len(cases) == len(names)
    lines = []
    return host.run(reps=1, cases=cases, out=lines.append), lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode stubs the interpreter")
def test_host_mode_counts_launches():
    names = ["BatchNorm2d(2048)+relu train", "BatchNorm2d(64)+relu train", "BatchNorm2d(2048) eval",
             "activation_dropout gelu p=0.1 +bias", "activation_dropout gelu p=0.1",
             "local_response_norm size 5", "weight_norm dim 0"]
    rows, lines = _rows(names)
    got = {r["case"]: r["tkern"]["counts"] for r in rows}
    # (Triton launches, other torch kernels) per direction, GPU plans (a 132-SM card).
    # A repeated call.  BatchNorm's module counts num_batches_tracked in its kernel (torch's
    # adds it with a kernel of its own); 7x7 channels fit a program (one launch each way),
    # 56x56 ones split (two)
    assert got["BatchNorm2d(2048)+relu train"] == {"fwd": (1, []), "bwd": (1, [])}
    assert got["BatchNorm2d(64)+relu train"] == {"fwd": (2, []), "bwd": (2, [])}
    assert got["BatchNorm2d(2048) eval"] == {"fwd": (1, []), "bwd": (1, [])}
    # with a bias the backward kernel sums the bias gradient into partial rows (GPU plans: a
    # program along rows per row group here) that its last programs add up: one kernel and the
    # zeroed int32 counts they take; no torch sum
    assert got["activation_dropout gelu p=0.1 +bias"] == {"fwd": (1, ["randint"]),
                                                          "bwd": (1, ["zeros"])}
    assert got["activation_dropout gelu p=0.1"] == {"fwd": (1, ["randint"]), "bwd": (1, [])}
    assert got["local_response_norm size 5"] == {"fwd": (1, []), "bwd": (1, [])}
    assert got["weight_norm dim 0"] == {"fwd": (1, []), "bwd": (1, [])}
    for r in rows:  # eager's side ran too, with kernels of its own and no Triton launches
        assert r["eager"]["counts"]["fwd"][0] == 0 and r["eager"]["counts"]["fwd"][1]
        assert r["tkern"]["fwd_us"] > 0 and r["eager"]["full_us"] > 0
    assert len(lines) == 5 + len(names) and all(n in "\n".join(lines) for n in names)
    assert lines[1].rstrip().endswith("| target")
    for r in rows:  # the kernel counts are exact: those targets hold on every machine
        assert "kernels" not in r["over"], (r["case"], r["over"])
        (line,) = [line for line in lines if line.startswith(f"{r['case']:38s} ")]
        assert line.endswith("| met") if r["met"] else "| OVER: " in line
    # BatchNorm's program in a bare Python Function: the reference line beside the floor
    assert lines[-2].startswith("bare: BatchNorm2d(2048)+relu train") and "x eager" in lines[-2]
    assert lines[-1].startswith("floor: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode stubs the interpreter")
def test_skipped_bodies_still_bind_arguments():
    """The stub runs Triton's argument binder: a wrong argument list still fails."""
    from tkern.ops.activation_dropout import _kernel

    with host.skip_kernel_bodies() as log, pytest.raises(TypeError):
        _kernel[(1,)](torch.ones(4))
    x = torch.ones(4)
    with host.skip_kernel_bodies() as log:
        y = torch.full_like(x, 7.0)
        import tkern
        tkern.local_response_norm(x.view(1, 4, 1), 3)
    assert log.launches == 1 and log.names == ["_lrn_forward_kernel"] and y.eq(7).all()


def test_verdict_counts_kernels_and_ratio():
    """The target column: Triton launches and torch kernels together (bar the CPU path's seed
    draw), and the fwd+bwd ratio where the case has one."""
    case = host.Case("c", None, (1,), (1,), ratio=1.0, kernels=(1, 2))

    def row(fwd, bwd, us):
        return dict(tkern=dict(counts={"fwd": fwd, "bwd": bwd}, full_us=us),
                    eager=dict(full_us=10.0))

    assert host.verdict(case, row((1, ["randint"]), (1, ["zeros"]), 9.0)) == (True, "")
    assert host.verdict(case, row((1, ["add_"]), (1, []), 10.0)) == (False, "fwd 2 > 1 kernels")
    assert host.verdict(case, row((1, []), (3, []), 11.0)) == (
        False, "bwd 3 > 2 kernels; 1.10x > 1.0x")
    assert host.verdict(host.Case("e", None, (1,), (1,)), row((1, []), (1, []), 30.0))[0]
