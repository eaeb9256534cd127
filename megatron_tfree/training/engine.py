"""The DeepSpeed engine, built from our :class:`~megatron_tfree.config.Config` even on one process.

* :func:`init_distributed` brings up ``torch.distributed`` (gloo on CPU, nccl on GPU) through
  DeepSpeed. It honours torchrun / the deepspeed launcher (``RANK``, ``WORLD_SIZE``, ...) and SLURM
  (``SLURM_PROCID``, ...); with no launcher it sets single-process defaults so plain
  ``python -m megatron_tfree.train`` works. DeepSpeed's shm comm op (a ~30 s C++ build on CPU) is
  skipped.
* :func:`setup_parallel` creates the (TP, PP, DP) groups of ``parallel.tensor`` / ``parallel.pipe``;
  :func:`build_model` builds the GPTModel or this rank's pipeline stage (GPTPipe).
* :func:`deepspeed_config` turns the config into DeepSpeed's JSON dict.
* :func:`build_engine` makes a torch AdamW (:class:`GuardedAdamW`) from the model's parameter groups,
  our LR schedule, and calls ``deepspeed.initialize``.
* :func:`teardown` ends a run without the gloo abort at interpreter exit.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_tfree.config import Config, ConfigError
from megatron_tfree.parallel.spawn import free_port, teardown  # noqa: F401 (re-exported)
from megatron_tfree.training.schedule import WarmupDecayLR


# --------------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------------


def _env_defaults() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM or single-process defaults."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            if "SLURM_LAUNCH_NODE_IPADDR" not in env:
                raise RuntimeError("SLURM run: set MASTER_ADDR to the first node's address "
                                   "(e.g. MASTER_ADDR=$(scontrol show hostnames | head -n1))")
            env["MASTER_ADDR"] = env["SLURM_LAUNCH_NODE_IPADDR"]
        # every task must agree on the port: derive it from the job id
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if int(env["WORLD_SIZE"]) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: start the run with torchrun, "
                               "the deepspeed launcher or srun")
        env["MASTER_PORT"] = str(free_port())


def init_distributed(timeout: Optional[float] = None) -> tuple[int, int]:
    """Initialise torch.distributed and DeepSpeed's comm layer once (idempotent) and return
    ``(rank, world_size)``. A process group created by the caller (tests) is adopted by DeepSpeed.
    ``timeout`` (seconds, ``training.collective_timeout``): how long a collective may wait for a peer."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed
    import deepspeed.comm as ds_comm
    import deepspeed.comm.torch  # noqa: F401  (the module object whose build_shm_op we replace)

    if dist.is_available() and dist.is_initialized() and ds_comm.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not dist.is_initialized():
        _env_defaults()
    # The shm comm op only speeds up intra-node CPU all-reduce; building it costs ~30 s per machine.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {"timeout": timedelta(seconds=timeout)} if timeout else {}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **kwargs)
    return dist.get_rank(), dist.get_world_size()


def setup_parallel(cfg: Config) -> Any:
    """Bring up torch.distributed and the (TP, PP, DP) groups of ``parallel.tensor`` / ``parallel.pipe``
    (:func:`megatron_tfree.parallel.state.initialize`); returns the layout. Idempotent for one layout."""
    from megatron_tfree.parallel import state

    _, world = init_distributed(cfg.training.collective_timeout)
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipe
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ConfigError(f"world size {world} is not divisible by parallel.tensor * parallel.pipe "
                          f"({tp} * {pp}); start {tp * pp}*k processes or change the layout")
    current = state.get()
    if state.is_initialized() and (current.tp, current.pp, current.world_size) == (tp, pp, world):
        return current
    state.destroy()
    layout = state.initialize(tp, pp, timeout=cfg.training.collective_timeout)
    _enable_tensor_parallel(layout)
    return layout


def _enable_tensor_parallel(layout: Any) -> None:
    """Hook for the model's tensor-parallel layers (they read :func:`megatron_tfree.parallel.state.get`)."""
    return None


def data_parallel_info(cfg: Config) -> tuple[int, int]:
    """``(dp_rank, dp_world)`` of this process: world / (tensor * pipe) data-parallel replicas."""
    layout = setup_parallel(cfg)
    return layout.dp_rank, layout.dp


# --------------------------------------------------------------------------------------------------
# DeepSpeed config, optimizer, engine
# --------------------------------------------------------------------------------------------------


def gradient_accumulation_steps(cfg: Config, dp_world: int) -> int:
    """``training.gradient_accumulation_steps``, or global / (micro * dp) when global_batch_size is set."""
    t = cfg.training
    if not t.global_batch_size:
        return t.gradient_accumulation_steps
    per_step = t.micro_batch_size * dp_world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
            f"training.micro_batch_size ({t.micro_batch_size}) * data-parallel size ({dp_world})")
    return t.global_batch_size // per_step


def deepspeed_config(cfg: Config, dp_world: int) -> dict[str, Any]:
    """The DeepSpeed JSON config equivalent to ``cfg`` for ``dp_world`` data-parallel ranks."""
    t = cfg.training
    gas = gradient_accumulation_steps(cfg, dp_world)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.micro_batch_size * gas * dp_world,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "gradient_clipping": float(t.gradient_clipping),
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        # our optimizer is a torch AdamW subclass, not one of DeepSpeed's listed types
        "zero_allow_untested_optimizer": True,
    }
    if cfg.parallel.pipe > 1:  # activations cross stages whole (no slicing over the TP group)
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if t.precision == "fp16":
        ds["fp16"].update({"loss_scale": 0, "initial_scale_power": 16})
    return ds


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW whose next update can be vetoed: with ``skip_next = True`` ``step()`` does nothing.

    The trainer sets the flag when a micro-batch of the step had a non-finite loss, so the step
    leaves parameters and moments untouched (DeepSpeed then discards the gradients as usual) and the
    LR schedule does not advance (:class:`WarmupDecayLR` reads the same flag).
    """

    skip_next: bool = False

    def step(self, closure=None):  # noqa: D102
        if self.skip_next:
            return None
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> GuardedAdamW:
    """AdamW over ``param_groups(model, weight_decay)`` with the betas/eps/lr of ``cfg.training``."""
    from megatron_tfree.model import param_groups

    t = cfg.training
    groups = param_groups(model, t.weight_decay)
    return GuardedAdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                        weight_decay=t.weight_decay)


def check_model_fits(cfg: Config, vocab_size: int) -> None:
    """Refuse, before allocating anything, a model whose fp32 weights alone (this rank's share) exceed the
    memory of this machine (every rank builds its part on the CPU first) or, unless ZeRO-3 partitions the
    weights over the data-parallel ranks afterwards, of its GPU: e.g. ``model.hidden_size=1e5`` asks for
    terabytes."""
    from megatron_tfree.plan import block_params

    m, p = cfg.model, cfg.parallel
    params = m.num_layers * block_params(cfg) + 2 * vocab_size * m.hidden_size + m.hidden_size
    need = 4 * params / (p.tensor * p.pipe)
    have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine"
    if torch.cuda.is_available() and p.zero_stage < 3:
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if gpu < have:
            have, where = gpu, "this GPU"
    if need > have:
        raise ConfigError(f"the model has {params / 1e9:.2f}B parameters: its fp32 weights alone need "
                          f"{need / 2**30:.1f} GiB per rank (parallel.tensor={p.tensor}, parallel.pipe={p.pipe}), "
                          f"{where} has {have / 2**30:.1f} GiB; check model.hidden_size / model.num_layers / the "
                          f"vocabulary size, or shard the model")


def build_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """The model of ``cfg`` for this rank: :class:`GPTModel`, or with ``parallel.pipe > 1`` this rank's
    stage of :class:`~megatron_tfree.model.pipe.GPTPipe` (same seed, same weights)."""
    from megatron_tfree.model import GPTModel

    from megatron_tfree.parallel.init import mark_replicated

    check_model_fits(cfg, vocab_size)
    layout = setup_parallel(cfg)
    if cfg.parallel.pipe == 1:
        model = GPTModel(cfg.model, cfg.tokenizer.kind, vocab_size, seed=cfg.training.seed)
    else:
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        from megatron_tfree.model.pipe import GPTPipe

        topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
        model = GPTPipe(cfg.model, cfg.tokenizer.kind, vocab_size, seed=cfg.training.seed, topology=topology)
    mark_replicated(model)  # the gradient norm counts every parameter once, whatever the layout
    return model


def build_engine(cfg: Config, model: torch.nn.Module) -> tuple[Any, GuardedAdamW, WarmupDecayLR]:
    """``deepspeed.initialize`` the model with our optimizer and schedule. Returns (engine, opt, sched).

    Without a pipeline DeepSpeed gets ``mpu=parallel.state.get()`` (its data-parallel groups, gradient
    norm and clipping follow the TP layout); a pipeline brings its own grid (same rank order), and
    its optimizer step is wrapped to skip non-finite steps (:func:`.steps.install_pipe_veto`)."""
    import deepspeed

    from megatron_tfree.parallel import state

    layout = setup_parallel(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = WarmupDecayLR(optimizer, cfg.training)
    mpu = None if cfg.parallel.pipe > 1 else state.get()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
                                           config=deepspeed_config(cfg, layout.dp))
    if cfg.parallel.pipe > 1:
        from megatron_tfree.training.steps import install_pipe_veto

        install_pipe_veto(engine, optimizer)
    return engine, optimizer, scheduler
