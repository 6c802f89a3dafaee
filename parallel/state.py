"""torch.distributed + Megatron-core parallel state, from torchrun's environment; the CPU shim.

`init_parallel(tensor_parallel, pipeline_parallel, seed)` is the one entry point:

* under `torchrun` it reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
  under plain `python script.py` it starts a one-process group on a free local port;
* backend NCCL when CUDA is available, gloo otherwise;
* then Megatron's `initialize_model_parallel(tp, pp)` (data parallel = world / (tp * pp)) and
  Megatron's model-parallel RNG seeding (`model_parallel_cuda_manual_seed`).

Without CUDA, `_install_cpu_shim()` runs first so that real Megatron-core modules (GPTModel with
TP and PP, the pipeline schedules, p2p communication) run on CPU over gloo. Everything the shim
changes is listed in its docstring; nothing of it is applied when CUDA is present.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.abc
import os
import random
import socket
import sys
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1_engine.parallel import megatron_compat  # noqa: F401 - first: quiets Megatron's import-time warnings
from r1_engine.parallel.nvtx import install_nvtx_timers, nvtx_range  # noqa: F401 - re-exported: the phase ranges' old home

__all__ = [
    "ParallelState",
    "init_parallel",
    "destroy_parallel",
    "get_parallel_state",
    "nvtx_range",
    "cpu_shim_installed",
]


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits in the (tp, pp, dp) grid. Megatron's order is tp-cp-ep-dp-pp:
    tensor-parallel ranks are adjacent global ranks, pipeline stages the slowest axis. Expert
    parallelism (ep) is carved out of the data-parallel ranks of a stage: ep ranks hold different
    experts of the same layers and exchange tokens all-to-all, each still feeding its own batch."""

    world_size: int
    rank: int
    local_rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    backend: str
    seed: int
    ep_size: int = 1
    ep_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the process that logs and writes files."""
        return self.rank == 0

    # Process groups are looked up in Megatron's registry each time (they are not picklable and
    # Megatron owns their lifetime).
    @property
    def tp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state as mpu

        return mpu.get_tensor_model_parallel_group()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state as mpu

        return mpu.get_pipeline_model_parallel_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state as mpu

        return mpu.get_data_parallel_group()

    @property
    def model_parallel_group(self) -> dist.ProcessGroup:
        """tp x pp ranks that together hold one copy of the model."""
        from megatron.core import parallel_state as mpu

        return mpu.get_model_parallel_group()

    @property
    def embedding_group(self) -> dist.ProcessGroup | None:
        """First and last pipeline stage (tied embeddings' gradients are summed over it)."""
        from megatron.core import parallel_state as mpu

        return mpu.get_embedding_group(check_initialized=False)

    def pp_global_rank(self, stage: int) -> int:
        """Global rank of pipeline stage `stage` with this rank's tp and dp coordinates."""
        return dist.get_global_rank(self.pp_group, stage)


_STATE: ParallelState | None = None
_WAIT_GROUP = None
WAIT_TIMEOUT = datetime.timedelta(days=2)
_WE_STARTED_DIST = False
_OUR_PORT: str | None = None  # MASTER_PORT we chose ourselves (no torchrun)


def get_parallel_state() -> ParallelState:
    """The state set by `init_parallel`; RuntimeError if it was not called."""
    if _STATE is None:
        raise RuntimeError("parallel state is not initialised: call parallel.init_parallel() first")
    return _STATE


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_parallel(
    tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234, expert_parallel: int = 1
) -> ParallelState:
    """Initialise torch.distributed and Megatron's model-parallel groups and RNG.

    expert_parallel must divide the data-parallel size (world / (tp * pp)); each expert is split over
    the tensor-parallel size like a dense MLP (expert TP = TP, Megatron's default).

    Safe to call twice: with the same sizes it returns the existing state; with other sizes it
    rebuilds Megatron's groups on the existing process group (tests do this).
    """
    global _STATE, _WE_STARTED_DIST
    if tensor_parallel < 1 or pipeline_parallel < 1 or expert_parallel < 1:
        raise ValueError(
            f"tensor_parallel={tensor_parallel}, pipeline_parallel={pipeline_parallel} and "
            f"expert_parallel={expert_parallel} must be >= 1"
        )
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        _install_cpu_shim()

    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    else:
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    model_parallel = tensor_parallel * pipeline_parallel
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world_size={world_size} is not divisible by tensor_parallel * pipeline_parallel = "
            f"{tensor_parallel} * {pipeline_parallel} = {model_parallel}"
        )
    if (world_size // model_parallel) % expert_parallel != 0:
        raise ValueError(
            f"expert_parallel={expert_parallel} must divide the data-parallel size world_size / (tp * pp) = "
            f"{world_size // model_parallel}"
        )

    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel as mtp

    if _STATE is not None and mpu.model_parallel_is_initialized():
        if (_STATE.tp_size, _STATE.pp_size, _STATE.ep_size, _STATE.seed) == (
                tensor_parallel, pipeline_parallel, expert_parallel, seed):
            return _STATE
        mpu.destroy_model_parallel()

    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"

    if not dist.is_initialized():
        global _OUR_PORT
        if "MASTER_PORT" not in os.environ or os.environ["MASTER_PORT"] == _OUR_PORT:
            if world_size != 1:
                raise ValueError(
                    f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun"
                )
            # Plain `python script.py`: a one-process group on a fresh local port.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            _OUR_PORT = os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=30),
        )
        _WE_STARTED_DIST = True
    else:
        backend = dist.get_backend()

    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=tensor_parallel,  # Megatron's default: experts split like dense MLPs
        # Megatron's optimizer setup asks for the gloo data-parallel groups, also on CPU.
        create_gloo_process_groups=True,
    )
    tp_rank = mpu.get_tensor_model_parallel_rank()
    pp_rank = mpu.get_pipeline_model_parallel_rank()
    dp_rank = mpu.get_data_parallel_rank()

    # Megatron's recipe (megatron/training/initialize.py:_set_random_seed): a different default
    # stream per pipeline stage, the model-parallel tracker keyed on the tp rank. On CPU the
    # shim's tracker forks CPU generator states instead of CUDA ones.
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    mtp.model_parallel_cuda_manual_seed(stage_seed, force_reset_rng=True)

    _STATE = ParallelState(
        world_size=world_size,
        rank=rank,
        local_rank=local_rank,
        tp_size=tensor_parallel,
        tp_rank=tp_rank,
        pp_size=pipeline_parallel,
        pp_rank=pp_rank,
        dp_size=world_size // model_parallel,
        dp_rank=dp_rank,
        device=device,
        backend=backend,
        seed=seed,
        ep_size=expert_parallel,
        ep_rank=mpu.get_expert_model_parallel_rank(),
    )
    global _WAIT_GROUP
    # one CPU group without the 30-minute collective timeout, for ranks that wait while one rank works alone
    # (an evaluation or rejection sampling on rank 0 of a 7B job takes longer than that)
    _WAIT_GROUP = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT) if world_size > 1 else None
    return _STATE


def wait_group():
    """A gloo group of every rank whose collectives wait up to WAIT_TIMEOUT (not the default 30 minutes): for the
    ranks that wait while one rank does work alone. None in a one-process job."""
    return _WAIT_GROUP


def destroy_parallel() -> None:
    """Tear down Megatron's groups and, if `init_parallel` created it, the process group."""
    global _STATE, _WE_STARTED_DIST, _WAIT_GROUP
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if _WE_STARTED_DIST and dist.is_initialized():
        dist.destroy_process_group()
    _WE_STARTED_DIST = False
    _STATE = None
    _WAIT_GROUP = None


# ---------------------------------------------------------------------------------------------
# The CPU shim
# ---------------------------------------------------------------------------------------------

_SHIM_INSTALLED = False
_CPU = torch.device("cpu")


def cpu_shim_installed() -> bool:
    return _SHIM_INSTALLED


def _is_cuda_device(value: object) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return False


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
              "randperm", "linspace", "eye", "empty_strided", "zeros_like", "ones_like", "empty_like", "full_like")


def _on_cpu(fn):
    """`fn` with `device=` a CUDA device (or an int index, as `torch.cuda.current_device()` returns on CUDA) and
    `pin_memory=True` rewritten to CPU; a call without keyword arguments goes straight through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs:
            device = kwargs.get("device")
            if device is not None and (isinstance(device, int) or _is_cuda_device(device)):
                kwargs["device"] = _CPU
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return wrapper


class _MegatronTorch(types.ModuleType):
    """`torch` as Megatron-core's modules see it without CUDA: the factories (`torch.zeros([], device="cuda")` in
    the schedules, the optimizer's and clip_grads' buffers, the attention masks) put a CUDA device on the CPU;
    every other name is torch's own. Only Megatron's module globals point here: torch itself is left alone
    (transformers swaps torch's factories while it loads a model, and a wrapper around them breaks that)."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_MEGATRON_TORCH: _MegatronTorch | None = None


def _point_megatron_at_cpu(module) -> None:
    if getattr(module, "__name__", "").startswith("megatron.") and getattr(module, "torch", None) is torch:
        module.torch = _MEGATRON_TORCH


class _MegatronLoader(importlib.abc.Loader):
    """A module's own loader, with one step after its code ran: `torch` -> `_MegatronTorch`."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _point_megatron_at_cpu(module)

    def __getattr__(self, name):  # get_data, get_resource_reader, ...: the inner loader's
        return getattr(self.inner, name)


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Megatron modules imported after the shim is installed get `_MegatronTorch` as well."""

    def find_spec(self, name, path, target=None):
        if not name.startswith("megatron."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _MegatronLoader(spec.loader)
        return spec


def _patch_cuda_calls() -> None:
    """The few ways Megatron names a CUDA device, pointed at the CPU: its factories with `device="cuda"` (through
    `_MegatronTorch`), `tensor.cuda()`, `tensor.to("cuda")`, `tensor.pin_memory()`, and `tensor.type()` (Megatron's
    gradient clipping asserts 'torch.cuda.FloatTensor'). Attribute patches, not a TorchFunctionMode: a mode sits in
    front of every torch call of the process, rollouts and kernels included (a decode step of the tiny model
    measured 8.3 ms without it, 9.1-10.2 ms with it)."""
    global _MEGATRON_TORCH
    _MEGATRON_TORCH = _MegatronTorch()
    for module in list(sys.modules.values()):
        _point_megatron_at_cpu(module)
    sys.meta_path.insert(0, _MegatronImportHook())
    to, type_ = torch.Tensor.to, torch.Tensor.type

    def to_cpu(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (_CPU, *args[1:])
        elif kwargs and _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return to(self, *args, **kwargs)

    def cuda_type_name(self, *args, **kwargs):
        name = type_(self, *args, **kwargs)
        if args or kwargs or not isinstance(name, str) or not name.startswith("torch.") or ".cuda." in name:
            return name
        return name.replace("torch.", "torch.cuda.", 1)  # stands in for a CUDA tensor here

    torch.Tensor.to = to_cpu  # type: ignore[method-assign]
    torch.Tensor.type = cuda_type_name  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]


class _NoStream:
    """Stand-in for torch.cuda.Stream / Event on CPU: every operation is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, *args) -> float:
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _install_cpu_shim() -> None:
    """Let Megatron-core's CUDA-only code paths run on a CPU-only torch (tests, laptops).

    Applied once per process, and only when CUDA is absent. Each patch and why:

    1. `torch.cuda.current_device()` returns the CPU device: Megatron allocates communication
       buffers, RoPE frequencies and p2p receive tensors with `device=torch.cuda.current_device()`
       (tensor_parallel/mappings.py, layers.py, pipeline_parallel/p2p_communication.py).
    2. The model-parallel RNG tracker forks CPU generator states: `get_cuda_rng_tracker().fork()`
       wraps every dropout and weight initialisation of a TP-split layer. `CudaRNGStatesTracker` is
       replaced in `megatron.core.tensor_parallel.random` by a subclass whose add/fork use
       `torch.get_rng_state`/`set_rng_state`; `_get_cuda_rng_state`/`_set_cuda_rng_state` (used by
       activation recomputation's `_fork_rng`) read and write the CPU generator.
    3. `torch.cuda.synchronize()` is a no-op (p2p_communication.py calls it after every batched
       isend/irecv); `torch.cuda.empty_cache()` too.
    4. `torch.cuda.Stream`, `Event`, `current_stream`, `stream(...)` are inert stand-ins (pipeline
       overlap helpers, timers); CPU work is synchronous.
    5. `_patch_cuda_calls()`: Megatron's modules see a `torch` whose factories map `device="cuda"` (and int
       device indices) and `pin_memory=True` to CPU (schedules.py builds `torch.zeros([], device="cuda")` for the token
       count); `.cuda()`, `.to("cuda")` and `.pin_memory()` stay on CPU; `tensor.type()` names CPU tensors as
       CUDA ones ('torch.cuda.FloatTensor'), which Megatron's gradient clipping asserts.
    Pipeline p2p needs nothing more: gloo supports isend/irecv and `batch_isend_irecv`.
    """
    global _SHIM_INSTALLED
    if _SHIM_INSTALLED or torch.cuda.is_available():
        return

    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    torch.cuda.Stream = _NoStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _NoStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda device=None: _NoStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG streams, held as CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer = self.states_[outer_name]
                torch.set_rng_state(outer)
                self._current_state_name = outer_name

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker  # type: ignore[misc]
    mrandom._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mrandom.initialize_rng_tracker(force_reset=True)

    _patch_cuda_calls()
    _SHIM_INSTALLED = True
