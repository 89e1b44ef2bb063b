"""The recipe sections every stage shares: ``base``, ``data``, ``lora``, ``train``,
``output``. Each field's docstring is its description (``adapterkit recipes --explain``); the
stage configs that combine them, and the stage-specific sections, are in ``config.py``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Quantization = Literal["nf4", "int8", "none"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class Section(BaseModel):
    """A recipe section: unknown keys refused; each field's docstring is its description
    (``adapterkit recipes --explain``)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class BaseSection(Section):
    name: str
    """hub name, local directory, or a registered name such as "tiny" (``resolvers.py``)"""
    revision: str | None = None
    """hub revision (branch, tag or commit) of a hub base"""
    quantization: Quantization = "nf4"
    """nf4 (QLoRA's 4-bit NormalFloat), int8, or none (full precision)"""
    compute_dtype: DType = "auto"
    """auto: bf16 on CUDA (fp16 before Ampere), fp32 on CPU (quant.resolve_dtype)"""
    double_quant: bool = True
    """quantize the 4-bit quantization constants too (QLoRA's double quantization)"""
    quant_storage: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = "auto"
    """the dtype the packed 4-bit weights are stored in (bnb_4bit_quant_storage); auto: the
    compute dtype under FSDP or DeepSpeed ZeRO-3 (which shard only float tensors of one dtype,
    as the FSDP-QLoRA recipe requires), uint8 otherwise"""
    trust_remote_code: bool = False
    """run a hub model's own modelling code (only for bases you trust)"""


class DataSection(Section):
    train: str
    """file, directory, hub dataset, or a registered scheme such as tiny:<split>"""
    eval: str | None = None
    """held-out data in the same forms as train: evaluation during and after training"""
    format: Literal["auto", "messages", "prompt_completion", "text", "preference", "prompt"] = "auto"
    """the rows' format; auto: detected from the first row's fields"""
    max_length: int = Field(256, gt=0)
    """tokens per row (prompt + response), as the policy on_long applies"""
    on_long: Literal["error", "truncate", "drop"] = "error"
    """a row over max_length: error (with its row number), truncate, or drop"""
    hub_split: str = "train"
    """the split of a hub dataset to read"""
    chat_template: str | None = None
    """a Jinja chat template (or a file holding one) for a base without one"""


class LoraSection(Section):
    r: int = Field(8, gt=0)
    """LoRA rank"""
    lora_alpha: float = Field(16, gt=0)
    """LoRA scaling numerator: the update is scaled by lora_alpha / r"""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """dropout on the LoRA input"""
    target_modules: str | list[str] = "all-linear"
    """modules that get LoRA: all-linear, or a list of module names"""


class TrainSection(Section):
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    """peak learning rate (AdamW)"""
    num_epochs: float = Field(1.0, gt=0)
    """passes over data.train (unless max_steps > 0)"""
    max_steps: int = -1
    """optimizer steps (PPO: PPO steps) to train; > 0 overrides num_epochs"""
    batch_size: int = Field(8, gt=0)
    """rows per device per micro-batch (PPO: per PPO minibatch)"""
    grad_accum: int = Field(1, gt=0)
    """micro-batches per optimizer step"""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """share of the steps spent warming the learning rate up"""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay"""
    lr_scheduler: str = "linear"
    """transformers scheduler name: linear, cosine, constant, ..."""
    max_grad_norm: float = Field(1.0, gt=0)
    """gradient clipping norm"""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass: less memory, more time"""
    packing: bool = False
    """SFT: pack several rows into each max_length sequence (fewer pad tokens, faster)"""
    padding_free: bool = False
    """SFT: concatenate a batch without padding (flash-attention kernels); not with packing"""
    seed: int = 0
    """seed of the adapter's initialisation, the data order and sampling"""
    logging_steps: int = Field(5, gt=0)
    """steps between logged values (progress bar, curves, trackers)"""
    progress: bool = True
    """one progress bar per stage (loss, reward, KL); false: silent"""
    eval_steps: int = Field(0, ge=0)
    """Evaluation on data.eval every N optimizer steps (PPO: every N PPO steps, as ppo.eval_every); 0: SFT once per epoch, reward and DPO once at the end"""
    save_steps: int = Field(0, ge=0)
    """Checkpoints every N optimizer steps (PPO: PPO steps); 0: none. They go to checkpoint_dir (default <output.dir>.checkpoint), one checkpoint-<step> folder each, weights as safetensors"""
    save_total_limit: int = Field(2, gt=0)
    """checkpoints kept: the last N"""
    checkpoint_dir: str | None = None
    """default: <output.dir>.checkpoint (a sibling of the adapter)"""
    resume_from: str | None = None
    """Resume from a checkpoint: a checkpoint-<step> folder, a checkpoint_dir (its newest), or "latest" (the newest in checkpoint_dir). Same seed and data: the same adapter as a run that was never stopped"""
    report_to: str | list[str] = "none"
    """Experiment trackers, as transformers' report_to: none, tensorboard, wandb, mlflow, ... (a list for several); PPO logs to the same ones through accelerate"""
    logging_dir: str | None = None
    """trackers' local folder; default: <output.dir>.logs"""


class OutputSection(Section):
    dir: str = "runs/adapter"
    """the adapter's folder (replaced only when it holds this same adapter, or overwrite)"""
    name: str | None = None
    """defaults to the stage name"""
    domain: str = "general"
    """the adapter's domain in the registry"""
    tags: list[str] = []
    """free tags in the manifest and the registry"""
    publish: str | None = None
    """registry name to publish under after training"""
    registry: str | None = None
    """registry root; default ./adapters or $ADAPTERKIT_REGISTRY"""
    overwrite: bool = False
    """replace an output.dir that holds something other than this adapter"""
    license: str | None = None
    """the model card's license (default: the base's own card's, when it has one)"""
