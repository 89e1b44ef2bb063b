"""Every private name of bitsandbytes, transformers and trl that adapterkit touches, and nothing else.

adapterkit is written for the versions pinned in pyproject.toml (``WRITTEN_FOR``). Each private
name is looked up through ``private``: when an upgrade moves or removes one, the run stops here
with a ``CompatError`` that names the package, its version, the name and this file, instead
of failing somewhere else or, worse, silently computing something different. A version
outside the tested range is logged once as a warning (the names may still be there).

Used by ``quant.py`` (bitsandbytes' CPU 4-bit internals), ``stages/dpo.py`` /
``stages/reward.py`` (trl's DPO loss entry point and init side effects, a warning filter) and
``stages/common.py`` (transformers' Trainer checkpoint hooks: safetensors and JSON, no pickle),
and ``memcheck.py`` (torch's CPU allocation events and cuBLAS workspaces).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import types
from importlib import metadata
from pathlib import Path

from adapterkit.errors import AdapterkitError

log = logging.getLogger("adapterkit")

WRITTEN_FOR = {"bitsandbytes": "0.50", "transformers": "5.24", "trl": "1.16"}  # major.minor, as pinned in pyproject.toml


class CompatError(AdapterkitError):
    """A private name of bitsandbytes, transformers or trl that adapterkit relies on is not there."""


@functools.cache
def check_version(package: str) -> str:
    """The installed version; a warning (once) when it is not the major.minor written for."""
    version = metadata.version(package)
    if ".".join(version.split(".")[:2]) != WRITTEN_FOR[package]:
        log.warning("%s %s: adapterkit was written for %s %s.x; its private names are checked in "
                    "adapterkit/_compat.py as they are used", package, version, package, WRITTEN_FOR[package])
    return version


# every private or internal name used below, for ``check_all`` (a test runs it on the pinned versions)
NAMES = (("bitsandbytes.functional", "_convert_weight_packed_for_cpu_inverse"),
         ("bitsandbytes.cextension", "lib"),
         ("bitsandbytes.nn.modules", "fix_4bit_weight_quant_state_from_module"),
         ("trl.models.utils", "disable_gradient_checkpointing"),
         ("trl.trainer.reward_trainer", "suppress_seqcls_warning"))


def check_all() -> None:
    """Look up every name adapterkit uses now (``CompatError`` on the first one missing)."""
    from trl import DPOTrainer
    for module, name in NAMES:
        private(module, name)
    dpo_loss_entry(DPOTrainer)
    trainer_checkpoint_hooks()


@functools.cache
def private(module: str, name: str, optional: bool = False):
    """``module.name`` (a private or internal name); raises ``CompatError`` when it is gone
    (``optional``: returns None instead, for a feature a version may not have)."""
    package = module.split(".")[0]
    version = check_version(package)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        if optional:
            return None
        raise CompatError(f"{package} {version} has no {module}.{name} ({err}); adapterkit uses it and was "
                          f"written for {package} {WRITTEN_FOR[package]}.x: install that version, or "
                          "update adapterkit/_compat.py") from None


# -- bitsandbytes: the CPU 4-bit layout and kernels (see quant.py) -----------------------------

def cpu_packed(quant_state) -> bool:
    """True when a 4-bit weight is in bitsandbytes' CPU inference layout (repacked for bf16)."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def unpack_cpu_weight(data, quant_state):
    """Undo the CPU repacking: (weight data, quant state) in the standard 4-bit layout, or None
    when this bitsandbytes has no such repacking."""
    inverse = private("bitsandbytes.functional", "_convert_weight_packed_for_cpu_inverse", optional=True)
    return None if inverse is None else inverse(data, quant_state)


def has_cpu_repacking() -> bool:
    return private("bitsandbytes.functional", "_convert_weight_packed_for_cpu_inverse", optional=True) is not None


def no_cpu_repacking(module) -> None:
    """Keep a Linear4bit from repacking itself for bf16 on its first eval-mode CPU forward."""
    module.support_avx512bf16_for_cpu = False


def cpu_dequantize_kernel(quant_type: str, dtype_tag: str):
    """bitsandbytes' native CPU dequantizer ``cdequantize_blockwise_cpu_<type>_<dtype>`` (a ctypes
    function), or None when the native library or that kernel is missing."""
    try:
        lib = private("bitsandbytes.cextension", "lib", optional=True)
        return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{dtype_tag}", None)
    except Exception:  # no native library, or a build without CPU kernels
        return None


def fix_quant_state(module) -> None:
    """What Linear4bit.forward does first: restore a quant state lost by a parameter copy."""
    private("bitsandbytes.nn.modules", "fix_4bit_weight_quant_state_from_module")(module)


# -- trl -------------------------------------------------------------------------------------------

TRL_REF_ADAPTER = "ref"  # the copy of ``default`` trl 1.16's DPOTrainer init adds to a PeftModel


def disable_gradient_checkpointing(model, kwargs):
    """trl's context manager that runs a forward without gradient checkpointing."""
    return private("trl.models.utils", "disable_gradient_checkpointing")(model, kwargs)


def suppress_seqcls_warning():
    """trl's context that silences transformers' 'newly initialized score head' warning."""
    return private("trl.trainer.reward_trainer", "suppress_seqcls_warning")()


def dpo_loss_entry(trainer_class) -> str:
    """The name of the DPOTrainer method that computes the loss from a batch (private in trl
    1.16); checked to exist so a subclass's override of it cannot silently stop being called."""
    check_version("trl")
    if not callable(getattr(trainer_class, "_compute_loss", None)):
        raise CompatError(f"trl {metadata.version('trl')}: DPOTrainer has no _compute_loss; adapterkit's "
                          "reference-from-the-parent-stack override needs it (update adapterkit/_compat.py)")
    return "_compute_loss"


def reference_from_batch(trainer, on: bool) -> None:
    """Make trl's DPO loss read the reference log-probs from the batch (``on``) or compute them."""
    trainer.precompute_ref_logps = on


def trainer_metrics(trainer, split: str = "eval") -> dict:
    """The metric lists trl's trainers collect before logging them (tests read these)."""
    return trainer._metrics[split]


def with_reference_in_batch(trainer_class, add_reference):
    """A subclass of trl's DPOTrainer whose loss first puts the reference log-probs into the batch
    (``add_reference(trainer, model, inputs) -> inputs``) and has trl read them from there."""
    name = dpo_loss_entry(trainer_class)
    loss_from_batch = getattr(trainer_class, name)

    def compute(self, model, inputs, return_outputs):
        inputs = add_reference(self, model, inputs)
        reference_from_batch(self, True)
        try:
            return loss_from_batch(self, model, inputs, return_outputs)
        finally:
            reference_from_batch(self, False)

    return type(trainer_class.__name__, (trainer_class,), {name: compute, "__doc__": trainer_class.__doc__})


# -- transformers: the Trainer's checkpoint files (see checkpoints.py) ------------------------------

# The private Trainer methods that write and read a checkpoint's files, with their parameters in
# transformers 5.24. ``_save_checkpoint`` (transformers' order: model, optimizer and scheduler,
# scaler, RNG, then trainer_state.json last; trl's model card first) and the training loop's
# calls stay transformers'; only the files change: safetensors and JSON instead of
# optimizer.pt, scheduler.pt, scaler.pt, rng_state.pth and training_args.bin (pickles).
TRAINER_CHECKPOINT_HOOKS = {
    "_save": ("output_dir", "state_dict"),
    "_save_optimizer_and_scheduler": ("output_dir",),
    "_save_scaler": ("output_dir",),
    "_save_rng_state": ("output_dir",),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_scaler": ("checkpoint",),
    "_load_rng_state": ("checkpoint",),
}


def trainer_checkpoint_hooks(trainer_class=None) -> None:
    """Check that transformers' Trainer still has each hook, with the same parameters."""
    if trainer_class is None:
        from transformers import Trainer as trainer_class
    version = check_version("transformers")
    for name, params in TRAINER_CHECKPOINT_HOOKS.items():
        method = getattr(trainer_class, name, None)
        found = tuple(inspect.signature(method).parameters)[1:] if callable(method) else None
        if found != params:
            raise CompatError(f"transformers {version}: Trainer.{name} is "
                              f"{'missing' if found is None else 'now (' + ', '.join(found) + ')'}, not "
                              f"({', '.join(params)}); adapterkit replaces it to write checkpoints without pickle "
                              f"and was written for transformers {WRITTEN_FOR['transformers']}.x: install that "
                              "version, or update adapterkit/_compat.py")


def safetensors_checkpoints(trainer, load_adapter) -> None:
    """Make a transformers/trl trainer write and read its checkpoints as safetensors and JSON
    (``checkpoints.py`` lists the files): its file hooks are replaced on this instance.
    ``load_adapter(trainer, folder, model)`` restores the trained weights on resume."""
    from adapterkit import checkpoints as ck
    trainer_checkpoint_hooks(type(trainer))

    def _save(self, output_dir=None, state_dict=None):
        """Trainer._save without training_args.bin: the model's save_pretrained (the PEFT
        adapter as safetensors) and the tokenizer."""
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True,
                              is_main_process=self.args.should_save)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.args.should_save:
            ck.save_optimizer(self.optimizer, Path(output_dir))
            ck.save_state_dict_json(self.lr_scheduler, Path(output_dir) / "scheduler.json")

    def _save_scaler(self, output_dir):
        scaler = getattr(self.accelerator, "scaler", None)
        if self.args.should_save and scaler is not None:
            ck.save_state_dict_json(scaler, Path(output_dir) / "scaler.json")

    def _save_rng_state(self, output_dir):
        os.makedirs(output_dir, exist_ok=True)  # another process may not have made it yet
        from transformers.training_args import ParallelMode
        ck.save_rng(Path(output_dir), ck.rng_name(self.args.process_index, self.args.world_size),
                    cuda_all=self.args.parallel_mode == ParallelMode.DISTRIBUTED)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_adapter(self, resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        ck.load_optimizer(self.optimizer, Path(checkpoint))
        ck.load_state_dict_json(self.lr_scheduler, Path(checkpoint) / "scheduler.json")

    def _load_scaler(self, checkpoint):
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None:
            ck.load_state_dict_json(scaler, Path(checkpoint) / "scaler.json")

    def _load_rng_state(self, checkpoint):
        if checkpoint is not None and not ck.load_rng(Path(checkpoint), ck.rng_name(self.args.process_index,
                                                                                     self.args.world_size)):
            log.warning("%s: no RNG state for this process; the resumed run may differ from an "
                        "uninterrupted one", checkpoint)

    hooks = {name: fn for name, fn in locals().items() if name in TRAINER_CHECKPOINT_HOOKS}
    assert hooks.keys() == TRAINER_CHECKPOINT_HOOKS.keys()
    for name, fn in hooks.items():
        setattr(trainer, name, types.MethodType(fn, trainer))


# -- torch: the profiler's CPU allocation events, cuBLAS workspaces (memcheck.py) -------------------

@contextlib.contextmanager
def cpu_allocation_peak():
    """Yields a dict whose ``peak`` is, after the block, the highest net number of bytes the
    CPU allocator had handed out (allocations minus frees) since the block began.

    torch has no public CPU counterpart of ``torch.cuda.max_memory_allocated``; its profiler
    with ``profile_memory=True`` records every CPU allocation and free as a ``[memory]`` event
    (signed bytes), read here from ``profile.profiler.kineto_results`` (not a documented name).
    Frees of tensors allocated before the block are not reported, as they should not be."""
    from torch.profiler import ProfilerActivity, profile
    result: dict = {"peak": 0}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    kineto = getattr(prof.profiler, "kineto_results", None)
    if kineto is None:
        raise CompatError(f"torch {torch_version()}: the profiler has no kineto_results; "
                          "adapterkit/_compat.py cpu_allocation_peak reads its [memory] events")
    events = sorted((e.start_ns(), e.nbytes()) for e in kineto.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    result["peak"] = peak


def clear_cublas_workspaces() -> None:
    """Free torch's cuBLAS(Lt) workspaces (``torch._C._cuda_clearCublasWorkspaces``, as torch's
    own CUDA leak check does before it counts allocated bytes); the next matmul makes them again.
    A measurement that starts here counts them as a fresh process does, whatever ran before."""
    import torch
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is None:
        raise CompatError(f"torch {torch_version()} has no torch._C._cuda_clearCublasWorkspaces; "
                          "adapterkit/_compat.py clear_cublas_workspaces uses it (memcheck.py)")
    clear()


def torch_version() -> str:
    return metadata.version("torch")
