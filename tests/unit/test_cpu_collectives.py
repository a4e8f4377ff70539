"""The CPU collective fallbacks: pinned to the Paddle they were written for, complete, idempotent, and exact.

If Paddle is upgraded, the first tests here fail and name what moved; re-examine each patch in
``paddle_llm/parallel/cpu_collectives.py`` against the new source before bumping ``PATCHED_PADDLE_VERSION``.
"""

import importlib
import inspect
import json
import textwrap

import paddle
import pytest

from paddle_llm.parallel import cpu_collectives
from paddle_llm.parallel.cpu_collectives import (
    CLASS_ATTRIBUTE_PATCHES,
    EVERYWHERE_PATCHES,
    MODULE_GLOBAL_PATCHES,
    PATCHED_PADDLE_VERSION,
    WORKED_AROUND,
    call_shape,
)
from tests.conftest import run_script


def test_paddle_is_the_version_the_patches_were_written_for():
    assert paddle.__version__ == PATCHED_PADDLE_VERSION, (
        f"Paddle {paddle.__version__} is installed but the CPU collectives patch Paddle {PATCHED_PADDLE_VERSION} internals: "
        "re-check every patch in paddle_llm/parallel/cpu_collectives.py against the new source, then bump PATCHED_PADDLE_VERSION"
    )


def test_this_process_is_unpatched():
    # the checks below compare Paddle's own functions; a test that installed the patches in-process would hide them
    for patch in EVERYWHERE_PATCHES:
        assert not patch.is_stand_in(getattr(importlib.import_module(patch.module), patch.name)), patch.name


@pytest.mark.parametrize("patch", EVERYWHERE_PATCHES, ids=lambda p: f"{p.module}.{p.name}")
def test_each_replaced_function_exists_with_the_parameters_its_replacement_copies(patch):
    original = getattr(importlib.import_module(patch.module), patch.name, None)
    assert original is not None, f"{patch.module}.{patch.name} is gone"
    assert call_shape(original) == call_shape(patch.stand_in(original)), f"{patch.module}.{patch.name} changed its parameters"


@pytest.mark.parametrize("patch", MODULE_GLOBAL_PATCHES, ids=lambda p: f"{p.module}.{p.name}")
def test_each_module_global_still_exists(patch):
    real = getattr(importlib.import_module(patch.module), patch.name, None)
    assert real is not None, f"{patch.module} no longer has a global {patch.name}"
    stand_in = patch.stand_in(real)
    if isinstance(stand_in, cpu_collectives.ModuleView):
        for name in vars(stand_in):
            if name != "stands_in_for":
                assert hasattr(real, name), f"{patch.module}: {patch.name}.{name} is gone"
    else:
        assert real in stand_in.__mro__, f"{stand_in.__name__} no longer extends {patch.module}.{patch.name}"


@pytest.mark.parametrize("patch", CLASS_ATTRIBUTE_PATCHES, ids=lambda p: f"{p.owner}.{p.name}")
def test_each_class_attribute_still_exists(patch):
    owner = getattr(importlib.import_module(patch.module), patch.owner)
    assert patch.name in vars(owner), f"{patch.module}.{patch.owner}.{patch.name} is gone"


@pytest.mark.parametrize("fragment", WORKED_AROUND, ids=lambda f: f"{f.qualname}: {f.fragment[:30]}")
def test_each_worked_around_line_still_reads_the_same(fragment):
    # If Paddle fixed the line, the patch may be unnecessary; if it rewrote it, the patch may be wrong.
    target = cpu_collectives._resolve(fragment.module, fragment.qualname)
    assert target is not None, f"{fragment.module}.{fragment.qualname} is gone"
    assert fragment.fragment in inspect.getsource(target), f"{fragment.qualname} no longer contains {fragment.fragment!r}"


def test_install_does_nothing_off_cpu():
    assert cpu_collectives.install_cpu_collectives("gpu:0") == []
    assert cpu_collectives.install_cpu_collectives("xpu") == []


def test_install_replaces_every_reference_once():
    script = textwrap.dedent(
        """
        import json, sys
        import paddlenlp.transformers, paddlenlp.peft  # modules holding their own references, loaded first
        from paddle_llm.parallel import cpu_collectives as cc
        first = cc.install_cpu_collectives("cpu")
        second = cc.install_cpu_collectives("cpu")
        left = []
        for patch in cc.EVERYWHERE_PATCHES:
            for name, module in cc._paddle_modules():
                for attribute, value in vars(module).items():
                    if getattr(value, "__module__", None) == patch.module and getattr(value, "__qualname__", None) == patch.name:
                        left.append(f"{name}.{attribute}")
        print(json.dumps({"first": first, "second": second, "left": left, "problems": cc.check_patch_targets()}))
        """
    )
    result = json.loads(run_script(["-c", script]).stdout.strip().splitlines()[-1])
    assert result["second"] == [], "a second install must change nothing"
    assert result["left"] == [], f"references to Paddle's originals survived: {result['left']}"
    assert result["problems"] == []
    for reference in (
        "paddle.distributed.fleet.layers.mpu.mp_ops._c_identity",
        "paddle.distributed.collective._c_identity",  # PaddleNLP's parallel_matmul reaches it here
        "paddle.distributed.fleet.meta_parallel.tensor_parallel.broadcast_input_data",  # imported by name
        "paddle.distributed.reduce_scatter",
        "paddle.distributed.communication.stream.reduce_scatter",  # sequence parallel calls it directly
        "paddle.distributed.communication.stream.send",  # pipeline messages: a gloo group per direction
        "paddle.distributed.communication.stream.recv",
        "paddle.distributed.fleet.meta_parallel.pp_utils.p2p_communication.initialize_p2p_groups",
        "paddle.distributed.parallel.ParallelEnv.device_id",
    ):
        assert reference in result["first"], reference


OPS_SCRIPT = textwrap.dedent(
    """
    import json, numpy as np, paddle, paddle.distributed as dist
    from paddle.distributed import fleet
    from paddle_llm.parallel.cpu_collectives import install_cpu_collectives
    paddle.set_device("cpu")
    install_cpu_collectives("cpu")
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 2, "pp_degree": 1}
    fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    group, rank = hcg.get_model_parallel_group(), hcg.get_model_parallel_rank()
    from paddle.distributed.fleet.layers.mpu import mp_ops
    rng = np.random.RandomState(0)
    x, w = rng.randn(3, 5, 8).astype("float32"), rng.randn(8, 6).astype("float32")
    errors = {}

    def reference(weight_axis):
        xr, wr = paddle.to_tensor(x, stop_gradient=False), paddle.to_tensor(w, stop_gradient=False)
        y = paddle.matmul(xr, wr)
        (y * y).sum().backward()
        return y.numpy(), xr.grad.numpy(), np.split(wr.grad.numpy(), 2, axis=weight_axis)[rank]

    def compare(name, y, xt, wl, weight_axis):
        (y * y).sum().backward()
        ry, rdx, rdw = reference(weight_axis)
        errors[name] = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12)) for a, b in ((y.numpy(), ry), (xt.grad.numpy(), rdx), (wl.grad.numpy(), rdw)))

    # column parallel: identity in, gather out (c_identity, c_concat)
    xt = paddle.to_tensor(x, stop_gradient=False)
    wl = paddle.to_tensor(np.split(w, 2, axis=1)[rank], stop_gradient=False)
    compare("column", mp_ops._c_concat(paddle.matmul(mp_ops._c_identity(xt, group=group), wl), group=group), xt, wl, 1)
    # row parallel: split in, all-reduce out (c_split, mp_allreduce)
    xt = paddle.to_tensor(x, stop_gradient=False)
    wl = paddle.to_tensor(np.split(w, 2, axis=0)[rank], stop_gradient=False)
    compare("row", mp_ops._mp_allreduce(paddle.matmul(mp_ops._c_split(xt, group=group), wl), group=group), xt, wl, 0)
    # vocabulary-parallel cross-entropy, with an ignored label
    logits = rng.randn(2, 4, 10).astype("float32")
    label = rng.randint(0, 10, (2, 4)).astype("int64")
    label[0, 1] = -100
    weights = paddle.arange(8, dtype="float32").reshape([2, 4, 1])
    lt = paddle.to_tensor(np.split(logits, 2, axis=-1)[rank], stop_gradient=False)
    loss = mp_ops._c_softmax_with_cross_entropy(lt, paddle.to_tensor(label).unsqueeze(-1), group=group)
    (loss * weights).sum().backward()
    lr = paddle.to_tensor(logits, stop_gradient=False)
    ref = paddle.nn.functional.cross_entropy(lr, paddle.to_tensor(label).unsqueeze(-1), reduction="none", ignore_index=-100)
    (ref * weights).sum().backward()
    errors["cross_entropy"] = max(float(np.abs(loss.numpy() - ref.numpy()).max()), float(np.abs(lt.grad.numpy() - np.split(lr.grad.numpy(), 2, axis=-1)[rank]).max()))
    # vocabulary-parallel embedding: c_embedding runs natively, its all-reduce goes through _mp_allreduce
    table = rng.randn(10, 4).astype("float32")
    ids = paddle.to_tensor([[1, 7, 3, 9]])
    part = paddle.to_tensor(np.split(table, 2)[rank])
    looked_up = mp_ops._mp_allreduce(mp_ops._c_lookup_table(part, ids, start_index=rank * 5), group=group)
    errors["embedding"] = float(np.abs(looked_up.numpy() - table[[[1, 7, 3, 9]]]).max())
    # reduce-scatter from all-reduce + slice
    out = paddle.zeros([3])
    dist.reduce_scatter(out, [paddle.arange(3, dtype="float32") * (rank + 1), paddle.arange(3, 6, dtype="float32") * (rank + 1)], group=group)
    errors["reduce_scatter"] = float(np.abs(out.numpy() - 3 * np.arange(3 * rank, 3 * rank + 3)).max())
    # sequence parallel: the row-parallel output is reduce-scattered along the sequence through the stream API
    from paddle.distributed.fleet.utils.sequence_parallel_utils import ReduceScatterOp
    xt = paddle.to_tensor(x * (rank + 1), stop_gradient=False)  # [3, 5, 8] partial sums; their sum is 3x
    y = ReduceScatterOp.apply(paddle.concat([xt, xt]))  # 6 positions, 3 per rank
    (y * y).sum().backward()  # the gradient comes back all-gathered: 2 * 3x for each copy of xt
    errors["sequence_parallel"] = max(float(np.abs(y.numpy() - 3 * x).max()), float(np.abs(xt.grad.numpy() - 2 * 2 * 3 * x).max()))
    print("ERRORS", json.dumps(errors), flush=True)
    # the cross-entropy's memory: new logits-sized tensors at its forward and backward peaks
    from paddle.base import core
    allocated = lambda: core.host_memory_stat_current_value("Allocated", 0)
    lt = paddle.randn([2, 64, 5000])
    lt.stop_gradient = False
    label = paddle.randint(0, 10000, [2, 64, 1])
    peaks = []
    for run in (lambda: mp_ops._c_softmax_with_cross_entropy(lt, label, group=group), lambda: loss.sum().backward()):
        before = allocated()
        core.host_memory_stat_reset_peak_value("Allocated", 0)
        loss = run() if not peaks else (run(), loss)[1]
        peaks.append((core.host_memory_stat_peak_value("Allocated", 0) - before) / (lt.numel().item() * 4))
    print("CROSS_ENTROPY_PEAKS", json.dumps(peaks), flush=True)
    """
)


def test_model_parallel_ops_on_two_processes_match_one_process(tmp_path):
    script = tmp_path / "ops.py"
    script.write_text(OPS_SCRIPT)
    log_dir = tmp_path / "log"
    run_script(["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir), str(script)], timeout=300)
    for rank in (0, 1):
        line = next(l for l in (log_dir / f"workerlog.{rank}").read_text().splitlines() if l.startswith("ERRORS"))
        errors = json.loads(line.split(" ", 1)[1])
        assert set(errors) == {"column", "row", "cross_entropy", "embedding", "reduce_scatter", "sequence_parallel"}
        for op, error in errors.items():
            assert error < 1e-5, (rank, op, error)
        # Like the GPU kernel, one logits-sized tensor in each pass: the softmax, then the gradient (the backward
        # peak also holds the leaf's .grad the test fills). The estimator counts the kernel's tensors, so the
        # measured tensor-parallel peaks (tests/integration/test_estimator_measured.py) depend on it.
        line = next(l for l in (log_dir / f"workerlog.{rank}").read_text().splitlines() if l.startswith("CROSS_ENTROPY_PEAKS"))
        forward, backward = json.loads(line.split(" ", 1)[1])
        assert forward < 1.05 and backward < 2.05, (rank, forward, backward)
