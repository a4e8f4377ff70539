"""The collectives and device checks that fleet's hybrid parallel needs on CPU processes, built from gloo's ops.

Why this exists: on GPU, tensor, pipeline and group-sharded parallel run on NCCL kernels. Paddle's CPU (gloo)
backend has ``all_reduce``, ``all_gather``, ``broadcast``, ``reduce`` and ``send``/``recv``, but:
  * no CPU kernel for the fused model-parallel ops (``c_identity``, ``c_split``, ``c_concat``,
    ``c_softmax_with_cross_entropy``) and no ``reduce_scatter``: each is a ``PyLayer`` (or function) over the gloo
    ops that exist, with the same maths forward and backward;
  * a few entry points assert a GPU or parse a GPU id (the tensor-parallel input broadcast, group-sharded stage 2/3,
    ``PipelineLayer``), and stage 2/3 assume their flat buffers and norms live on a GPU: each is lifted or given a
    CPU path where it stands, for that one module;
  * gloo process groups meet in the shared store under keys that do not name the group, so groups formed one after
    another (tensor x pipeline on 4 processes) read each other's addresses: each group gets a store of its own.
  * gloo pairs a send with a receive by counting the operations on their group, which the stages of a pipeline of 3
    or more do not count alike: pipeline messages travel over a two-rank group per direction between neighbours.
Fleet's batched pipeline send/recv (NCCL group calls on the compute stream) is avoided by configuration, not here:
``config.validation.apply_cpu_fallbacks`` selects fleet's isend/irecv path on CPU.

Rules:
  * This is the only module of ours that patches Paddle or PaddleNLP. ``install_cpu_collectives()`` is called once
    per process, before ``fleet.init`` and model construction, and only when training on CPU with more than one
    process: a GPU run uses fleet and PaddleNLP unchanged.
  * Several modules hold their own reference to a patched function (``from mp_ops import _c_identity``), so every
    reference in every loaded ``paddle``/``paddlenlp`` module is replaced, not one module attribute.
  * ``_c_lookup_table`` (vocab-parallel embedding) is not patched: its ``c_embedding`` kernel has a CPU
    implementation (a masked lookup with no communication); the all-reduce after it goes through ``_mp_allreduce``.
  * The patches were written against ``PATCHED_PADDLE_VERSION``; ``tests/unit/test_cpu_collectives.py`` fails when
    Paddle changes under them (version, signatures, the source lines worked around).
"""

from __future__ import annotations

import inspect
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from paddle.autograd import PyLayer
from paddle.base import core
from paddle.distributed import ReduceOp
from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_storage import ParamStorage
from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_utils import GroupShardedClipGrad
from paddle.distributed.fleet.utils import hybrid_parallel_util

PATCHED_PADDLE_VERSION = "3.3.1"
_MP_OPS = "paddle.distributed.fleet.layers.mpu.mp_ops"


# ---------------------------------------------------------------------------------------------------------------
# Gloo building blocks
# ---------------------------------------------------------------------------------------------------------------


def _group_or_global(group):
    return group if group is not None else paddle.distributed.collective._get_default_group()


def _last_axis_shard(tensor: paddle.Tensor, group) -> paddle.Tensor:
    """This rank's equal slice of the last axis (rank order = group order, as NCCL's ``c_split`` cuts it)."""
    return paddle.split(tensor, group.nranks, axis=-1)[group.rank].clone()


def _all_gather_last_axis(tensor: paddle.Tensor, group) -> paddle.Tensor:
    shards: list[paddle.Tensor] = []
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return paddle.concat(shards, axis=-1)


def _all_reduced(tensor: paddle.Tensor, group, op=ReduceOp.SUM) -> paddle.Tensor:
    """A reduced copy: autograd may still need the input, so it is never reduced in place."""
    result = tensor.clone()
    dist.all_reduce(result, op=op, group=group)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Model-parallel ops: PyLayers with the forward and backward of the NCCL kernels they stand in for
# ---------------------------------------------------------------------------------------------------------------


class _CopyThenAllReduceGrad(PyLayer):
    """``c_identity``: the input of a column-parallel layer; each rank's gradient is partial, so backward sums."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_reduced(grad, ctx.group)


class _AllReduceThenCopyGrad(PyLayer):
    """``mp_allreduce``: the output of a row-parallel layer (partial sums); the summed output's gradient is whole."""

    @staticmethod
    def forward(ctx, tensor, group):
        return _all_reduced(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _SplitThenGatherGrad(PyLayer):
    """``c_split``: keep this rank's slice of the last axis; backward gathers the slices back."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _last_axis_shard(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_axis(grad, ctx.group)


class _GatherThenSplitGrad(PyLayer):
    """``c_concat``: gather every rank's slice of the last axis; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _all_gather_last_axis(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return _last_axis_shard(grad, ctx.group)


class _VocabParallelCrossEntropy(PyLayer):
    """``c_softmax_with_cross_entropy``: cross-entropy over logits whose vocabulary is split across the group.

    Each rank holds the logits of vocabulary rows ``[rank * V, (rank + 1) * V)``. The softmax needs the global max
    and the global sum of exponentials (two all-reduces), and the label's logit lives on one rank (a third
    all-reduce of a masked pick). Labels equal to ``ignore_index`` get loss 0 and no gradient, as in the kernel.
    Like the GPU kernel, it holds one vocabulary-wide tensor besides the logits in each pass (the softmax, then its
    gradient), worked on in place, so that measured CPU memory is what the estimator counts for the kernel.
    """

    @staticmethod
    def forward(ctx, logits, label, group, ignore_index):
        local_vocab = logits.shape[-1]
        softmax = logits - _all_reduced(logits.max(axis=-1, keepdim=True), group, ReduceOp.MAX)
        local_label = label - group.rank * local_vocab
        on_this_rank = paddle.logical_and(local_label >= 0, local_label < local_vocab)
        safe_label = paddle.where(on_this_rank, local_label, paddle.zeros_like(local_label))
        # broadcast=False: the default broadcast_to copies the whole vocabulary-wide input first.
        picked = paddle.take_along_axis(softmax, safe_label, axis=-1, broadcast=False) * on_this_rank.astype(softmax.dtype)
        label_logit = _all_reduced(picked, group)
        softmax.exp_()
        sum_exponentials = _all_reduced(softmax.sum(axis=-1, keepdim=True), group)
        softmax.divide_(sum_exponentials)
        kept = (label != ignore_index).astype(logits.dtype)
        loss = (paddle.log(sum_exponentials) - label_logit) * kept
        ctx.save_for_backward(softmax, safe_label, on_this_rank, kept)
        return loss, softmax

    @staticmethod
    def backward(ctx, loss_grad, softmax_grad=None):
        softmax, safe_label, on_this_rank, kept = ctx.saved_tensor()
        scale = loss_grad * kept
        grad = softmax * scale  # (softmax - one_hot(label)) * scale, the one-hot part added in place below
        grad.put_along_axis_(safe_label, -scale * on_this_rank.astype(scale.dtype), axis=-1, reduce="add")
        return grad, None


# The replacements keep the originals' signatures exactly (the unit test compares them), including parameters
# that only matter to the NCCL kernels (streams, the skip-c_identity overlap switch).


def c_identity(tensor, group=None, skip_c_identity_dynamic=False):
    """CPU ``mp_ops._c_identity``: identity forward, all-reduce of the gradient over the model-parallel group."""
    if group is not None and not group.is_member():
        return None
    if skip_c_identity_dynamic:
        return tensor  # fleet's overlap mode: the gradient all-reduce is done by the layer itself
    return _CopyThenAllReduceGrad.apply(tensor, _group_or_global(group))


def mp_allreduce(
    tensor,
    op=ReduceOp.SUM,
    group=None,
    use_calc_stream=True,
    use_model_parallel=True,
    skip_c_identity_dynamic=False,
):
    """CPU ``mp_ops._mp_allreduce``: sum over the model-parallel group forward, identity backward."""
    if group is not None and not group.is_member():
        return None
    if op != ReduceOp.SUM:
        raise ValueError(f"_mp_allreduce supports only ReduceOp.SUM, got {op}")
    return _AllReduceThenCopyGrad.apply(tensor, _group_or_global(group))


def c_split(tensor, group=None):
    """CPU ``mp_ops._c_split``: this rank's slice of the last axis; the backward gathers."""
    if group is not None and not group.is_member():
        return None
    return _SplitThenGatherGrad.apply(tensor, _group_or_global(group))


def c_concat(tensor, group=None):
    """CPU ``mp_ops._c_concat``: gather the last axis from every rank; the backward keeps this rank's slice."""
    if group is not None and not group.is_member():
        return None
    return _GatherThenSplitGrad.apply(tensor, _group_or_global(group))


def c_softmax_with_cross_entropy(logits, label, group=None, return_softmax=False, ignore_index=-100):
    """CPU ``mp_ops._c_softmax_with_cross_entropy``: loss shaped like ``label`` with a trailing axis of 1."""
    if group is not None and not group.is_member():
        return None
    if len(label.shape) == len(logits.shape) - 1:
        label = label.unsqueeze(-1)
    loss, softmax = _VocabParallelCrossEntropy.apply(logits, label, _group_or_global(group), ignore_index)
    return (loss, softmax) if return_softmax else loss


class _FinishedTask:
    """What an async collective returns, for a collective that already finished (gloo ops here are blocking)."""

    def wait(self):
        return True

    def is_completed(self):
        return True


def reduce_scatter(tensor, tensor_list, op=ReduceOp.SUM, group=None, sync_op=True):
    """CPU ``paddle.distributed.reduce_scatter``: all-reduce the whole input, keep this rank's equal part.

    Twice the traffic of a true reduce-scatter, which only matters for speed; the result is the same.
    ``tensor_list`` is a list with one tensor per rank, or one tensor cut into equal flat parts (both are accepted
    by Paddle's stream API, and fleet's fused gradient buffers pass the latter).
    """
    group = _group_or_global(group)
    whole = paddle.concat([t.flatten() for t in tensor_list]) if isinstance(tensor_list, (list, tuple)) else tensor_list.flatten()
    reduce_op = ReduceOp.SUM if op == ReduceOp.AVG else op
    reduced = _all_reduced(whole, group, reduce_op)
    if op == ReduceOp.AVG:
        reduced = reduced / group.nranks
    part = reduced.numel().item() // group.nranks
    with paddle.no_grad():
        tensor.copy_(reduced[group.rank * part : (group.rank + 1) * part].reshape(tensor.shape), False)
    return _FinishedTask()


def stream_reduce_scatter(tensor, tensor_or_tensor_list, op=ReduceOp.SUM, group=None, sync_op=True, use_calc_stream=False):
    """CPU ``paddle.distributed.stream.reduce_scatter``: the same all-reduce and slice as ``reduce_scatter``.

    Sequence parallel calls the stream API directly (``sequence_parallel_utils.reduce_scatter``, the row-parallel
    output and the column-parallel input gradient), so it needs its own stand-in; there is no stream to choose on CPU.
    """
    return reduce_scatter(tensor, tensor_or_tensor_list, op, group, sync_op)


def broadcast_input_data(hcg, *inputs, **kwargs):
    """CPU ``hybrid_parallel_util.broadcast_input_data``: fleet's own broadcast helpers, on the CPU place.

    The original asserts a GPU/XPU and parses a device id from ``paddle.get_device()``; its helpers already handle
    a CPU place, so only the place changes.
    """
    place = paddle.CPUPlace()
    if inputs:
        inputs = hybrid_parallel_util._broadcast_nested_data(hcg, "cpu", place, inputs)
    if kwargs:
        kwargs = hybrid_parallel_util._broadcast_nested_data(hcg, "cpu", place, kwargs)
    return inputs, kwargs


# ---------------------------------------------------------------------------------------------------------------
# Process groups: one rendezvous store per gloo group
# ---------------------------------------------------------------------------------------------------------------


def _this_host() -> str:
    """The address other ranks reach this process at (the launcher's endpoint for it, or loopback)."""
    endpoint = os.environ.get("PADDLE_CURRENT_ENDPOINT", "")
    return endpoint.rsplit(":", 1)[0] if ":" in endpoint else "127.0.0.1"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _group_private_store(shared_store, rank: int, world_size: int, group_id: int):
    """A TCP store for one group's rendezvous, hosted by the group's first member, found through the shared store."""
    address_key = f"paddle_llm/cpu_collectives/group_store/{group_id}"
    if rank == 0:
        host = _this_host()
        port = _free_port(host)
        # Published first: the host's store waits for every member to connect before it returns.
        shared_store.set(address_key, f"{host}:{port}".encode())
        return core.TCPStore(host, port, True, world_size)
    shared_store.wait(address_key)
    host, port = bytes(shared_store.get(address_key)).decode().rsplit(":", 1)
    return core.TCPStore(host, int(port), False, world_size)


def one_store_per_gloo_group(create_process_group: Callable) -> Callable:
    """CPU ``collective._new_process_group_impl``: each gloo group meets in a store of its own.

    Paddle's ``ProcessGroupGloo`` connects a new group's members through the shared TCP store under keys that
    do not name the group (``"0"``, ``"1"``, ...). A group formed later can read an earlier group's addresses, or
    two disjoint groups forming at once overwrite each other's: measured on 4 processes, tensor 2 x pipeline 2
    fails in gloo's ``pair.cc`` (timeouts, or "sizeof(impl_) == bytes.size(). 136 vs 45"). A store per group
    keeps every group's keys apart. The global group keeps the shared store.
    """

    def _new_process_group_impl(
        backend,
        store,
        rank,
        world_size,
        group_name,
        pg_options,
        group_id=0,
        nccl_comm_init_option=0,
        nccl_config=None,
    ):
        if backend == "gloo" and group_id != 0:
            store = _group_private_store(store, rank, world_size, group_id)
        return create_process_group(
            backend, store, rank, world_size, group_name, pg_options, group_id, nccl_comm_init_option, nccl_config
        )

    _new_process_group_impl.cpu_stand_in_for = create_process_group
    return _new_process_group_impl


# ---------------------------------------------------------------------------------------------------------------
# Pipeline send/recv: one gloo group per direction between neighbouring stages
# ---------------------------------------------------------------------------------------------------------------

# (pipeline group id, sending rank, receiving rank) -> the two-rank group that carries those messages
_DIRECTION_GROUPS: dict[tuple[int, int, int], object] = {}


def _direction_group(group, source: int, destination: int):
    return _DIRECTION_GROUPS.get((getattr(group, "id", None), source, destination), group)


def pipeline_direction_groups(initialize_p2p_groups: Callable) -> Callable:
    """CPU ``p2p_communication.initialize_p2p_groups``: first form a group for each direction between neighbours.

    ``ProcessGroupGloo`` tags every send and receive with a counter of the operations on that group, and a
    message is delivered only when the tags match. In a pipeline of 2 the two ranks count alike; with 3 or more
    they do not (rank 1 has received from rank 0 before it sends to rank 2, which has done nothing yet), and the
    first send between stages 1 and 2 times out in gloo. Measured: PP4 x virtual_pp_degree 2 fails this way on
    its first step. A group per (sender, receiver) carries one stream of messages in one order, so its counters
    agree. The ring includes last -> first, which the interleaved (virtual) schedule uses.
    Every rank calls this (``PipelineParallel.__init__``), so every rank forms the groups in the same order.
    """

    def _initialize_p2p_groups(hcg, enable_partial_send_recv=True, enable_timer=False):
        pipe = hcg.get_pipe_parallel_group()
        if pipe.nranks > 2 and pipe.backend.lower() == "gloo":
            me = dist.get_rank()
            for ranks in hcg.topology().get_comm_list("pipe"):
                for position, stage in enumerate(ranks):
                    following = ranks[(position + 1) % len(ranks)]
                    for source, destination in ((stage, following), (following, stage)):
                        group = dist.new_group([source, destination])
                        if me in (source, destination):
                            _DIRECTION_GROUPS[(pipe.id, source, destination)] = group
        return initialize_p2p_groups(hcg, enable_partial_send_recv, enable_timer)

    _initialize_p2p_groups.cpu_stand_in_for = initialize_p2p_groups
    return _initialize_p2p_groups


def send_over_direction_group(send: Callable) -> Callable:
    """CPU ``paddle.distributed.stream.send``: a pipeline message goes over its direction's group (see above)."""

    def _send(tensor, dst=0, group=None, sync_op=True, use_calc_stream=False):
        return send(tensor, dst, _direction_group(group, dist.get_rank(), dst), sync_op, use_calc_stream)

    _send.cpu_stand_in_for = send
    return _send


def receive_over_direction_group(recv: Callable) -> Callable:
    """CPU ``paddle.distributed.stream.recv``: a pipeline message comes over its direction's group (see above)."""

    def _recv(tensor, src=0, group=None, sync_op=True, use_calc_stream=False):
        return recv(tensor, src, _direction_group(group, src, dist.get_rank()), sync_op, use_calc_stream)

    _recv.cpu_stand_in_for = recv
    return _recv


# ---------------------------------------------------------------------------------------------------------------
# Group-sharded (stage 2/3) pieces that assume a GPU
# ---------------------------------------------------------------------------------------------------------------


class CpuGroupShardedClipGrad(GroupShardedClipGrad):
    """Global-norm clipping for group-sharded stage 2/3 on CPU processes.

    Paddle's version copies the norm to a GPU before its all-reduce (its CPU branch serves parameters offloaded
    from a GPU) and parses a device id. Here the norm is all-reduced where it is. The maths is Paddle's: squared
    norms of sliced parameters are summed over the sharding group, those of unsliced (replicated) parameters are
    counted once, and every gradient is scaled by ``clip_norm / max(norm, clip_norm)``.
    """

    @paddle.autograd.no_grad()
    def _dygraph_clip(self, params_grads):
        clipped = [(p, g) for p, g in params_grads if g is not None and getattr(p, "need_clip", True)]
        zero = paddle.zeros([], dtype="float32")
        sliced = [paddle.sum(paddle.square(g)).astype("float32") for p, g in clipped if not hasattr(p, "unslice")]
        unsliced = [paddle.sum(paddle.square(g)).astype("float32") for p, g in clipped if hasattr(p, "unslice")]
        sliced_sum = paddle.add_n(sliced) if sliced else zero
        dist.all_reduce(sliced_sum, group=self._group)
        norm = paddle.sqrt(sliced_sum + (paddle.add_n(unsliced) if unsliced else zero))
        max_norm = paddle.full([], self.clip_norm, dtype="float32")
        scale = max_norm / paddle.maximum(norm, max_norm)
        for _, grad in clipped:
            grad.scale_(scale.astype(grad.dtype))
        return params_grads


class CpuParamStorage(ParamStorage):
    """Stage 2's flat parameter buffer on CPU processes.

    By default Paddle copies each parameter to the CPU buffer, frees the parameter, then moves the buffer to the
    GPU; on a CPU process the "copy" is the parameter itself, so freeing it loses the values. The path Paddle uses
    for offloaded parameters (``convert_gpu=False``) is the right one when the device is the CPU.
    """

    @paddle.autograd.no_grad()
    def add_rank_params(self, trainable_params, param2align, convert_gpu=True):
        return super().add_rank_params(trainable_params, param2align, convert_gpu=False)


# ---------------------------------------------------------------------------------------------------------------
# GPU-only asserts and device ids, lifted for one module each
# ---------------------------------------------------------------------------------------------------------------


class ModuleView:
    """What one Paddle module sees in place of a module it imported: the real module, a few attributes overridden.

    Installed in a single module's globals, so the override reaches that module's code and nothing else.
    """

    def __init__(self, module, **overrides):
        self.stands_in_for = module
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self.stands_in_for, name)

    def __repr__(self):
        overridden = sorted(k for k in self.__dict__ if k != "stands_in_for")
        return f"<view of {self.stands_in_for.__name__} overriding {overridden}>"


def _answer_cuda_compiled() -> bool:
    return True


def _cpu_accepted_as_custom_device() -> list[str]:
    return list(paddle.device.get_all_custom_device_type() or []) + ["cpu"]


def _device_with_id() -> str:
    device = paddle.get_device()
    return device if ":" in device else f"{device}:0"


def _device_id_or_zero(parallel_env) -> int:
    # A CPU process has one device, id 0; ParallelEnv sets _device_id only for GPU/XPU/custom builds.
    return getattr(parallel_env, "_device_id", 0)


CPU_DEVICE_ID = property(_device_id_or_zero, doc="The selected device id; 0 on a CPU process.")


# ---------------------------------------------------------------------------------------------------------------
# The patch table
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EverywherePatch:
    """Replace a function in its module and in every loaded paddle/paddlenlp module holding its own reference.

    ``replacement`` is the CPU function itself, or, with ``wraps_original``, a factory that receives Paddle's
    function and returns one that calls it.
    """

    module: str
    name: str
    replacement: Callable
    reason: str
    wraps_original: bool = False

    def stand_in(self, original: Callable) -> Callable:
        return self.replacement(original) if self.wraps_original else self.replacement

    def is_stand_in(self, value) -> bool:
        return value is self.replacement or (self.wraps_original and hasattr(value, "cpu_stand_in_for"))


@dataclass(frozen=True)
class ModuleGlobalPatch:
    """Replace one global of one module (a module it imported, or a class it instantiates) with a CPU stand-in.

    ``stand_in`` receives the current value and returns the replacement.
    """

    module: str
    name: str
    stand_in: Callable[[object], object]
    reason: str


@dataclass(frozen=True)
class ClassAttributePatch:
    """Replace one attribute of a class (a property) for every instance."""

    module: str
    owner: str
    name: str
    replacement: object
    reason: str


@dataclass(frozen=True)
class SourceFragment:
    """A line of Paddle source a patch works around: if Paddle rewrites it, the patch must be re-examined."""

    module: str
    qualname: str
    fragment: str


_SHARDING = "paddle.distributed.fleet.meta_parallel.sharding"

EVERYWHERE_PATCHES: tuple[EverywherePatch, ...] = (
    EverywherePatch(_MP_OPS, "_c_identity", c_identity, "c_identity has no CPU kernel"),
    EverywherePatch(_MP_OPS, "_mp_allreduce", mp_allreduce, "its backward calls c_identity, which has no CPU kernel"),
    EverywherePatch(_MP_OPS, "_c_split", c_split, "c_split has no CPU kernel"),
    EverywherePatch(_MP_OPS, "_c_concat", c_concat, "c_concat has no CPU kernel"),
    EverywherePatch(
        _MP_OPS, "_c_softmax_with_cross_entropy", c_softmax_with_cross_entropy, "c_softmax_with_cross_entropy has no CPU kernel"
    ),
    EverywherePatch(
        "paddle.distributed.communication.reduce_scatter", "reduce_scatter", reduce_scatter, "ProcessGroupGloo has no reduce_scatter"
    ),
    EverywherePatch(
        "paddle.distributed.communication.stream.reduce_scatter",
        "reduce_scatter",
        stream_reduce_scatter,
        "ProcessGroupGloo has no reduce_scatter (sequence parallel calls the stream API directly)",
    ),
    EverywherePatch(
        "paddle.distributed.fleet.utils.hybrid_parallel_util",
        "broadcast_input_data",
        broadcast_input_data,
        "asserts GPU/XPU and parses a device id (called before every tensor-parallel forward)",
    ),
    EverywherePatch(
        "paddle.distributed.collective",
        "_new_process_group_impl",
        one_store_per_gloo_group,
        "gloo groups rendezvous under keys shared by all groups (tensor x pipeline on 4 processes fails)",
        wraps_original=True,
    ),
    EverywherePatch(
        "paddle.distributed.fleet.meta_parallel.pp_utils.p2p_communication",
        "initialize_p2p_groups",
        pipeline_direction_groups,
        "gloo matches send to recv by a per-group operation count, which stages of a pipeline of 3+ do not share",
        wraps_original=True,
    ),
    EverywherePatch(
        "paddle.distributed.communication.stream.send", "send", send_over_direction_group, "pipeline messages use a group per direction",
        wraps_original=True,
    ),
    EverywherePatch(
        "paddle.distributed.communication.stream.recv", "recv", receive_over_direction_group, "pipeline messages use a group per direction",
        wraps_original=True,
    ),
)

MODULE_GLOBAL_PATCHES: tuple[ModuleGlobalPatch, ...] = (
    ModuleGlobalPatch(
        "paddle.distributed.sharding.group_sharded",
        "paddle",
        lambda real: ModuleView(real, device=ModuleView(real.device, get_all_custom_device_type=_cpu_accepted_as_custom_device)),
        "group_sharded_parallel (sharding stage2/3) asserts gpu, xpu or a custom device",
    ),
    ModuleGlobalPatch(
        f"{_SHARDING}.group_sharded_optimizer_stage2",
        "core",
        lambda real: ModuleView(real, is_compiled_with_cuda=_answer_cuda_compiled),
        "GroupShardedOptimizerStage2 asserts a CUDA/XPU build",
    ),
    ModuleGlobalPatch(
        f"{_SHARDING}.group_sharded_optimizer_stage2",
        "paddle",
        lambda real: ModuleView(real, get_device=_device_with_id),
        "GroupShardedOptimizerStage2 parses a device id from paddle.get_device() ('cpu' has none)",
    ),
    ModuleGlobalPatch(
        f"{_SHARDING}.group_sharded_optimizer_stage2",
        "ParamStorage",
        lambda real: CpuParamStorage,
        "stage 2's parameter buffer frees the parameters when the device is the CPU",
    ),
    ModuleGlobalPatch(
        f"{_SHARDING}.group_sharded_optimizer_stage2",
        "GroupShardedClipGrad",
        lambda real: CpuGroupShardedClipGrad,
        "GroupShardedClipGrad moves the norm to a GPU",
    ),
    ModuleGlobalPatch(
        f"{_SHARDING}.group_sharded_stage3",
        "core",
        lambda real: ModuleView(real, is_compiled_with_cuda=_answer_cuda_compiled),
        "GroupShardedStage3 asserts a CUDA/XPU build (the rest of it handles device 'cpu')",
    ),
    ModuleGlobalPatch(
        f"{_SHARDING}.group_sharded_stage3",
        "GroupShardedClipGrad",
        lambda real: CpuGroupShardedClipGrad,
        "GroupShardedClipGrad moves the norm to a GPU",
    ),
)

CLASS_ATTRIBUTE_PATCHES: tuple[ClassAttributePatch, ...] = (
    ClassAttributePatch(
        "paddle.distributed.parallel", "ParallelEnv", "device_id", CPU_DEVICE_ID, "PipelineLayer reads it; a CPU process never sets it"
    ),
)

# The source lines the patches above work around, checked by the unit test.
WORKED_AROUND: tuple[SourceFragment, ...] = (
    SourceFragment("paddle.distributed.fleet.utils.hybrid_parallel_util", "broadcast_input_data", "dev_idx = int(cur_device.split(':')[1])"),
    SourceFragment("paddle.distributed.sharding.group_sharded", "group_sharded_parallel", "or device in paddle.device.get_all_custom_device_type()"),
    SourceFragment(
        f"{_SHARDING}.group_sharded_optimizer_stage2", "GroupShardedOptimizerStage2.__init__", 'self.dev_id = int(paddle.get_device().split(":")[1])'
    ),
    SourceFragment(f"{_SHARDING}.group_sharded_optimizer_stage2", "GroupShardedOptimizerStage2.__init__", "core.is_compiled_with_cuda()"),
    SourceFragment(f"{_SHARDING}.group_sharded_optimizer_stage2", "GroupShardedOptimizerStage2._integration_params", "param_storage.add_rank_params("),
    SourceFragment(f"{_SHARDING}.group_sharded_storage", "ParamStorage._add_param_as_view", "param._clear_data()"),
    SourceFragment(f"{_SHARDING}.group_sharded_utils", "GroupShardedClipGrad._dygraph_clip", "global_norm_var.cuda(dev_id)"),
    SourceFragment(f"{_SHARDING}.group_sharded_stage3", "GroupShardedStage3.__init__", "core.is_compiled_with_cuda()"),
    SourceFragment("paddle.distributed.fleet.meta_parallel.parallel_layers.pp_layers", "PipelineLayer.__init__", "dist.ParallelEnv().device_id"),
    SourceFragment("paddle.distributed.parallel", "ParallelEnv.device_id", "return self._device_id"),
    SourceFragment("paddle.distributed.collective", "_new_process_group_impl", "core.ProcessGroupGloo.create(store, rank, world_size, group_id)"),
)


# ---------------------------------------------------------------------------------------------------------------
# Installing
# ---------------------------------------------------------------------------------------------------------------


def _import(module_name: str):
    __import__(module_name)
    return sys.modules[module_name]


def _is_stand_in(value) -> bool:
    return isinstance(value, ModuleView) or value in (CpuParamStorage, CpuGroupShardedClipGrad)


def _paddle_modules():
    for name, module in list(sys.modules.items()):
        if module is not None and (name in ("paddle", "paddlenlp") or name.startswith(("paddle.", "paddlenlp."))):
            yield name, module


def _replace_everywhere(patch: EverywherePatch) -> list[str]:
    current = getattr(_import(patch.module), patch.name)
    if patch.is_stand_in(current):
        return []
    stand_in = patch.stand_in(current)
    replaced = []
    for module_name, module in _paddle_modules():
        namespace = getattr(module, "__dict__", {})
        for attribute, value in list(namespace.items()):
            if value is current:
                setattr(module, attribute, stand_in)
                replaced.append(f"{module_name}.{attribute}")
    return replaced


def call_shape(function: Callable) -> tuple:
    """Parameter names, kinds and defaults: what a caller relies on (annotations are ignored)."""
    return tuple((p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values())


def _resolve(module_name: str, qualname: str):
    target = _import(module_name)
    for part in qualname.split("."):
        target = inspect.getattr_static(target, part, None) if isinstance(target, type) else getattr(target, part, None)
        if target is None:
            return None
    return target.fget if isinstance(target, property) else target


def check_patch_targets() -> list[str]:
    """Return one problem per patch target that is missing or has changed shape in the installed Paddle.

    Checks that every function replaced everywhere still exists with the parameters its replacement copies, that
    every module global still exists with the attributes its stand-in overrides, that every class attribute still
    exists, and that every source line worked around still reads the same.
    """
    problems = []
    for patch in EVERYWHERE_PATCHES:
        current = getattr(_import(patch.module), patch.name, None)
        if current is None:
            problems.append(f"{patch.module}.{patch.name} no longer exists")
        elif not patch.is_stand_in(current) and call_shape(current) != call_shape(patch.stand_in(current)):
            problems.append(
                f"{patch.module}.{patch.name}{inspect.signature(current)} changed; the CPU replacement has "
                f"{inspect.signature(patch.stand_in(current))}"
            )
    for patch in MODULE_GLOBAL_PATCHES:
        current = getattr(_import(patch.module), patch.name, None)
        if current is None:
            problems.append(f"{patch.module} no longer has a global {patch.name}")
            continue
        real = current.stands_in_for if isinstance(current, ModuleView) else current
        stand_in = current if _is_stand_in(current) else patch.stand_in(real)
        if isinstance(stand_in, ModuleView):
            missing = [name for name in vars(stand_in) if name != "stands_in_for" and not hasattr(real, name)]
            problems += [f"{patch.module}: {patch.name}.{name} no longer exists" for name in missing]
        elif stand_in is not real and real not in stand_in.__mro__:
            problems.append(f"{patch.module}.{patch.name} is no longer the class {stand_in.__name__} extends")
    for patch in CLASS_ATTRIBUTE_PATCHES:
        if _resolve(patch.module, f"{patch.owner}.{patch.name}") is None:
            problems.append(f"{patch.module}.{patch.owner}.{patch.name} no longer exists")
    for fragment in WORKED_AROUND:
        target = _resolve(fragment.module, fragment.qualname)
        if target is None:
            problems.append(f"{fragment.module}.{fragment.qualname} no longer exists")
        elif getattr(target, "__module__", None) != __name__ and fragment.fragment not in inspect.getsource(target):
            # (once installed, a replaced function is ours: Paddle's source is checked before installing)
            problems.append(f"{fragment.module}.{fragment.qualname} no longer contains {fragment.fragment!r}")
    return problems


def install_cpu_collectives(device: str | None = None) -> list[str]:
    """Patch fleet's model-parallel ops, reduce-scatter and GPU-only asserts for CPU processes. Idempotent.

    Call before ``fleet.init`` (PaddleNLP's TrainingArguments) and before the model is built.

    Args:
        device: the training device; defaults to ``paddle.get_device()``. Anything but CPU patches nothing.

    Returns:
        ``module.attribute`` for every reference changed by this call (empty when not on CPU or already installed).

    Raises:
        RuntimeError: a patch target is missing or changed in the installed Paddle (see ``check_patch_targets``).
    """
    if not str(device or paddle.get_device()).startswith("cpu"):
        return []
    if paddle.__version__ != PATCHED_PADDLE_VERSION:
        warnings.warn(
            f"paddle_llm's CPU collectives were written for Paddle {PATCHED_PADDLE_VERSION}, this is {paddle.__version__}; "
            "run tests/unit/test_cpu_collectives.py before trusting multi-process CPU runs",
            stacklevel=2,
        )
    problems = check_patch_targets()
    if problems:
        raise RuntimeError("cannot install the CPU collectives:\n" + "\n".join(problems))
    # Load every module that holds its own reference before scanning, so none keeps an original.
    for module_name in ("paddle.distributed.collective", "paddle.distributed.fleet.meta_parallel", "paddle.distributed.sharding"):
        _import(module_name)
    patched = []
    for patch in EVERYWHERE_PATCHES:
        patched += _replace_everywhere(patch)
    for patch in MODULE_GLOBAL_PATCHES:
        module = _import(patch.module)
        current = getattr(module, patch.name)
        if not _is_stand_in(current):
            setattr(module, patch.name, patch.stand_in(current))
            patched.append(f"{patch.module}.{patch.name}")
    for patch in CLASS_ATTRIBUTE_PATCHES:
        owner = getattr(_import(patch.module), patch.owner)
        if owner.__dict__.get(patch.name) is not patch.replacement:
            setattr(owner, patch.name, patch.replacement)
            patched.append(f"{patch.module}.{patch.owner}.{patch.name}")
    return patched
