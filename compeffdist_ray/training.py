"""Student training on Ray Train with DeepSpeed: the one trainer of the warmup and finetune stages.

`train_student(rows, spec)` tokenizes the rows on the driver with the student's chat template
(loss on the response only, `compeffdist_ray.sft`), optionally packs them, and streams them from
Ray Data into `TorchTrainer` workers (dataset shards). Each worker runs a DeepSpeed engine (ZeRO
0-3, optional CPU offload; bf16 on GPU, fp32 on CPU through DeepSpeed's CPU accelerator and
gloo), optionally with LoRA adapters (peft; only the adapters train and are checkpointed, and
the export merges them), and reports a checkpoint every `checkpoint_every` optimizer steps.
The final report carries the exported model in Hugging Face format (safetensors, config,
tokenizer, generation config).

Resume: checkpoints live under `<storage_path>/<name>`; a run started again with the same
name (the caller derives it from the stage's fingerprint) continues from the latest one at
the same step, and skips the micro-batches already consumed, so the data order is the same as
in an uninterrupted run. The row order is fixed on the driver (shuffled there under the
seed, one shuffle per epoch) and the Ray Data pipeline preserves it.

    >>> result = train_student(rows_df, TrainSpec(model_path=..., storage_path="/tmp/ckpt", name="warmup-ab12"))
    >>> result.model_dir, result.history[-1]["loss"]
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from compeffdist_ray.errors import UserError

log = logging.getLogger("compeffdist_ray")

__all__ = ["TrainSpec", "TrainResult", "train_student", "deepspeed_config", "lr_lambda", "check_resources",
           "lora_config", "with_lora",
           "spec_from_config", "train_view", "remove_run_storage", "history_frame"]

EXPORT_MARKER = "compeffdist_export.json"
DS_TAG = "ds"


@dataclass
class TrainSpec:
    """Everything a training run needs; plain values, so it travels to the workers as is."""

    model_path: str
    storage_path: str
    name: str
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    torch_threads: int | None = None
    placement_strategy: str = "PACK"
    max_failures: int = 0
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "auto"
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 2048
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    gradient_clipping: float = 1.0
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 42
    packing: bool = False
    lora_r: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"
    model_card: dict = field(default_factory=dict)

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision


@dataclass
class TrainResult:
    model_dir: str  # the exported Hugging Face model (a local directory)
    steps: int
    history: list[dict]  # one entry per optimizer step: step, loss, lr, tokens
    examples: int  # training examples (all epochs)
    too_long: int  # rows dropped for exceeding max_length
    resumed_from_step: int
    train_tokens: int
    wall_time_s: float
    worker_nodes: list[str] = field(default_factory=list)  # node id of each rank


def spec_from_config(cfg, *, model_path: str, name: str, epochs: int = 1, max_steps: int | None = None,
                     lr: float | None = None, model_card: dict | None = None) -> TrainSpec:
    """A TrainSpec from the `train` config section plus a stage's own settings."""
    tc = cfg.train
    storage = tc.storage_path or _default_storage(cfg.run_dir)
    threads = tc.torch_threads
    if threads is None and cfg.ray.address is None and not tc.use_gpu:
        # Local mode: stages run one at a time, so the workers may use every core between them.
        threads = max(1, int(cfg.ray.num_cpus or os.cpu_count() or 1) // tc.num_workers)
    return TrainSpec(
        model_path=model_path, storage_path=storage, name=name, num_workers=tc.num_workers, use_gpu=tc.use_gpu,
        cpus_per_worker=tc.cpus_per_worker, gpus_per_worker=tc.gpus_per_worker, torch_threads=threads,
        placement_strategy=tc.placement_strategy, max_failures=tc.max_failures, zero_stage=tc.zero_stage,
        offload_optimizer=tc.offload_optimizer, offload_params=tc.offload_params, precision=tc.precision,
        micro_batch_size=tc.micro_batch_size, gradient_accumulation_steps=tc.gradient_accumulation_steps,
        max_length=tc.max_length, lr=lr if lr is not None else tc.lr, weight_decay=tc.weight_decay,
        betas=(float(tc.betas[0]), float(tc.betas[1])), warmup_steps=tc.warmup_steps, lr_schedule=tc.lr_schedule,
        gradient_clipping=tc.gradient_clipping, gradient_checkpointing=tc.gradient_checkpointing,
        checkpoint_every=tc.checkpoint_every, keep_checkpoints=tc.keep_checkpoints, epochs=epochs,
        max_steps=max_steps, seed=cfg.seed, lora_r=tc.lora.r, lora_alpha=tc.lora.alpha,
        lora_dropout=tc.lora.dropout, lora_target_modules=tc.lora.target_modules, model_card=dict(model_card or {}),
    )


# Train settings that change where and how fast training runs, never the model it produces.
_PLACEMENT_KEYS = {"storage_path", "max_failures", "keep_checkpoints", "checkpoint_every", "cpus_per_worker",
                   "torch_threads",
                   "gpus_per_worker", "placement_strategy", "gradient_checkpointing", "offload_optimizer",
                   "offload_params"}


def train_view(train_cfg) -> dict:
    """The `train` settings that change the trained model (for stage fingerprints).

    Without LoRA (r = 0) its other settings change nothing, so they are left out: changing them
    (or a version of this tool that adds such a setting) does not redo a full fine-tuning.
    """
    view = {k: v for k, v in asdict(train_cfg).items() if k not in _PLACEMENT_KEYS}
    if not view["lora"]["r"]:
        del view["lora"]
    return view


def remove_run_storage(spec: TrainSpec) -> None:
    """Delete a finished run's checkpoints (the exported model has been copied out)."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(spec.storage_path)
    except Exception:  # a plain local path
        fs, root = pafs.LocalFileSystem(), os.path.abspath(spec.storage_path)
    path = root.rstrip("/") + "/" + spec.name
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _default_storage(run_dir: str) -> str:
    if "://" in run_dir and not run_dir.startswith("file://"):
        return run_dir.rstrip("/") + "/_train"
    path = run_dir[len("file://"):] if run_dir.startswith("file://") else run_dir
    return os.path.join(os.path.abspath(os.path.expanduser(path)), "_train")


# --------------------------------------------------------------------------------------------
# pure pieces (unit-tested without Ray)
# --------------------------------------------------------------------------------------------


def deepspeed_config(spec: TrainSpec, world_size: int) -> dict:
    """The DeepSpeed config dict for a spec (optimizer built by DeepSpeed; schedule by us)."""
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.zero_stage >= 1 and spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.use_gpu}
    if spec.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if spec.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": spec.use_gpu}
    precision = spec.resolved_precision()
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "train_batch_size": spec.micro_batch_size * spec.gradient_accumulation_steps * world_size,
        "gradient_clipping": spec.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": spec.lr, "betas": list(spec.betas), "eps": 1e-8, "weight_decay": spec.weight_decay,
                       # DeepSpeed's fused Adam needs a compiled op; torch's AdamW runs everywhere.
                       "torch_adam": not spec.offload_optimizer},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return cfg


def lora_config(spec: TrainSpec):
    """The peft ``LoraConfig`` of a spec, or None for full fine-tuning."""
    if spec.lora_r <= 0:
        return None
    from peft import LoraConfig

    names = spec.lora_target_modules.strip()
    targets = names if names == "all-linear" else [m.strip() for m in names.split(",") if m.strip()]
    return LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def with_lora(model, spec: TrainSpec):
    """``model`` with LoRA adapters (base weights frozen) if the spec asks for them, else as is."""
    config = lora_config(spec)
    if config is None:
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise UserError(f"train.lora.target_modules={spec.lora_target_modules!r}: {str(exc).splitlines()[0]}; "
                        f"use all-linear or names of the model's linear layers") from None


def effective_warmup(spec: TrainSpec, total_steps: int) -> int:
    """Warm-up steps, capped at a tenth of the run (a short run would otherwise never warm up)."""
    return min(spec.warmup_steps, max(1, total_steps // 10)) if total_steps > 0 else 0


def lr_lambda(spec: TrainSpec, total_steps: int):
    """The LR multiplier at each optimizer step: linear warm-up, then cosine/linear/constant."""
    warm = effective_warmup(spec, total_steps)
    schedule = spec.lr_schedule

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if schedule == "constant" or total_steps <= warm:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def check_resources(spec: TrainSpec, cluster: dict, nodes: list[dict]) -> None:
    """Fail fast (UserError) when the cluster cannot place the workers, instead of hanging."""
    need_cpu = spec.num_workers * spec.cpus_per_worker
    need_gpu = spec.num_workers * spec.gpus_per_worker if spec.use_gpu else 0.0
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    alive = [n for n in nodes if n.get("Alive", True)]
    problems = []
    if need_cpu > have_cpu + 1e-9:
        problems.append(f"{need_cpu:g} CPUs ({spec.num_workers} workers x {spec.cpus_per_worker:g}) but the "
                        f"cluster has {have_cpu:g}")
    if need_gpu > have_gpu + 1e-9:
        problems.append(f"{need_gpu:g} GPUs ({spec.num_workers} workers x {spec.gpus_per_worker:g}) but the "
                        f"cluster has {have_gpu:g}")
    if spec.placement_strategy == "STRICT_SPREAD" and spec.num_workers > len(alive):
        problems.append(f"STRICT_SPREAD needs {spec.num_workers} nodes (one per worker) but the cluster has "
                        f"{len(alive)}")
    if spec.placement_strategy == "STRICT_SPREAD":
        fitting = sum(1 for n in alive if n.get("Resources", {}).get("CPU", 0.0) + 1e-9 >= spec.cpus_per_worker)
        if fitting < spec.num_workers and not problems:
            problems.append(f"STRICT_SPREAD needs {spec.num_workers} nodes with {spec.cpus_per_worker:g} CPUs "
                            f"each; {fitting} have them")
    if problems:
        raise UserError("train: cannot place the training workers: " + "; ".join(problems) +
                        "; lower train.num_workers / train.cpus_per_worker / train.gpus_per_worker or add nodes")


def preflight_resources(cfg) -> None:
    """Local mode: check the `train` workers fit this machine before any stage starts.

    On a cluster (`ray.address` set) the same check runs against the live cluster when training starts.
    """
    if cfg.ray.address is not None:
        return
    cpus = float(cfg.ray.num_cpus or os.cpu_count() or 1)
    gpus = 0.0
    if cfg.train.use_gpu:
        import torch

        gpus = float(torch.cuda.device_count())
    spec = spec_from_config(cfg, model_path="", name="preflight")
    check_resources(spec, {"CPU": cpus, "GPU": gpus}, [{"Alive": True, "Resources": {"CPU": cpus, "GPU": gpus}}])


def epoch_order(n: int, epochs: int, seed: int) -> list[int]:
    """Row indices for all epochs: each epoch a fresh permutation under (seed, epoch)."""
    import numpy as np

    order: list[int] = []
    for e in range(epochs):
        order.extend(np.random.default_rng([seed, e]).permutation(n).tolist())
    return order


# --------------------------------------------------------------------------------------------
# the per-worker loop
# --------------------------------------------------------------------------------------------


def _worker_loop(config: dict) -> None:
    import time
    import warnings

    # DeepSpeed calls a torch.distributed API that torch has deprecated: noise, not news.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from compeffdist_ray.sft import collate, pad_id_of

    spec = TrainSpec(**config["spec"])
    total_steps, micro_per_worker = config["total_steps"], config["micro_per_worker"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if spec.use_gpu else torch.device("cpu")
    if not spec.use_gpu:
        torch.set_num_threads(spec.torch_threads or max(1, int(spec.cpus_per_worker)))
    torch.manual_seed(spec.seed)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    dtype = torch.bfloat16 if spec.resolved_precision() == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        if spec.lora_r > 0:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    model = with_lora(model, spec)
    pad_id = pad_id_of(tokenizer)

    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(spec, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec, total_steps)),
    )

    # Where each rank runs (the multi-node placement is checked from this, and reported).
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    start_step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            if os.path.exists(os.path.join(d, EXPORT_MARKER)):
                # The run had finished and exported; report the export again (a retried driver).
                _report_export(d, rank)
                return
            # With LoRA only the adapters were saved: the frozen base weights are already loaded.
            _, client = engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=spec.lora_r <= 0)
            start_step, history = int(client["step"]), list(client["history"])
        if rank == 0:
            print(f"[compeffdist] resumed from step {start_step} of {total_steps}", flush=True)

    shard = ray.train.get_dataset_shard("train")
    log_every = max(1, total_steps // 20)
    micro_done = 0
    skip = start_step * spec.gradient_accumulation_steps
    step, step_loss, step_tokens, t0 = start_step, [], 0, time.perf_counter()

    def examples():
        # Rows are already tokenized (and packed) on the driver: a shard's order is the run's order.
        for batch in shard.iter_batches(batch_size=spec.micro_batch_size, batch_format="pandas", drop_last=True,
                                        prefetch_batches=2):
            yield batch.to_dict("records")

    for encoded in examples():
        if micro_done >= micro_per_worker:
            break
        micro_done += 1
        if micro_done <= skip:
            continue
        batch = {k: v.to(device) for k, v in collate(encoded, pad_id).items()}
        lr_now = float(scheduler.get_last_lr()[0])  # the rate this step trains with
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        step_loss.append(float(out.loss.detach()))
        step_tokens += int(batch["attention_mask"].sum())
        if micro_done % spec.gradient_accumulation_steps:
            continue
        step += 1
        stats = torch.tensor([sum(step_loss) / len(step_loss), float(step_tokens)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)
        entry = {"step": step, "loss": round(float(stats[0]) / world, 6), "lr": lr_now,
                 "tokens": int(stats[1]), "time_s": round(time.perf_counter() - t0, 3)}
        history.append(entry)
        step_loss, step_tokens, t0 = [], 0, time.perf_counter()
        if rank == 0 and (step % log_every == 0 or step == total_steps):
            print(f"[compeffdist] {spec.name}: step {step}/{total_steps} loss {entry['loss']:.4f} "
                  f"lr {entry['lr']:.3g} {entry['tokens'] / max(entry['time_s'], 1e-9):.0f} tokens/s", flush=True)
        # Metrics go to Ray Train with the checkpoints only: every report is a sync point.
        if step % spec.checkpoint_every == 0 and step < total_steps:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step, "history": history},
                                       exclude_frozen_parameters=spec.lora_r > 0)
                if world > 1:
                    dist.barrier()
                ray.train.report(dict(entry), checkpoint=Checkpoint.from_directory(tmp))
        _maybe_inject_failure(step)
        if step >= total_steps:
            break

    _export(engine, tokenizer, spec, rank, world, history, step, start_step, nodes)


def _maybe_inject_failure(step: int) -> None:
    """Fault injection for tests: COMPEFFDIST_FAIL_AT_STEP=N makes a worker raise once at step N.

    "Once" is kept by a marker file (COMPEFFDIST_FAIL_MARKER), so the restarted worker group
    passes the same step. Never set in normal runs.
    """
    at, marker = os.environ.get("COMPEFFDIST_FAIL_AT_STEP"), os.environ.get("COMPEFFDIST_FAIL_MARKER")
    if at and marker and step == int(at) and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(step))
        raise RuntimeError(f"injected failure at step {step} (COMPEFFDIST_FAIL_AT_STEP)")


def _export(engine, tokenizer, spec: TrainSpec, rank: int, world: int, history: list, step: int,
            start_step: int, nodes: list) -> None:
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    if spec.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state = engine.module.state_dict() if rank == 0 else None
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            model = engine.module
            if spec.lora_r > 0:
                model = _merged_lora(spec, state)
                state = None
            model.config.use_cache = True
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            meta = {"steps": step, "resumed_from_step": start_step, "history": history, "worker_nodes": nodes,
                    "spec": asdict(spec)}
            with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
                json.dump(meta, f, indent=1, default=str)
        if world > 1:
            dist.barrier()
        last = dict(history[-1]) if history else {"step": step}
        ray.train.report(last, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)


def _merged_lora(spec: TrainSpec, state: dict):
    """A plain model: the base weights with the trained adapters (``state``, the engine's peft
    state dict, gathered under ZeRO-3) merged in. Built fresh on CPU, so that no ZeRO partitioning
    or engine wrapper gets in the way."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if spec.resolved_precision() == "bf16" else torch.float32
    fresh = with_lora(AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype), spec)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    lora_missing = [k for k in missing if "lora_" in k]
    if lora_missing or unexpected:
        raise RuntimeError(f"LoRA export: trained state does not match the adapters (missing {lora_missing[:3]}, "
                           f"unexpected {list(unexpected)[:3]})")
    return fresh.merge_and_unload()


def _report_export(directory: str, rank: int) -> None:
    import ray.train
    from ray.train import Checkpoint

    with open(os.path.join(directory, EXPORT_MARKER)) as f:
        meta = json.load(f)
    last = dict(meta["history"][-1]) if meta["history"] else {"step": meta["steps"]}
    ray.train.report(last, checkpoint=Checkpoint.from_directory(directory) if rank == 0 else None)


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------


def train_student(rows, spec: TrainSpec, out_dir: str) -> TrainResult:
    """Train on `rows` (a DataFrame with instruction, text, response) and export into `out_dir`.

    `out_dir` is a local directory that receives the Hugging Face model; the caller copies it
    into the run directory.
    """
    import time

    import pandas as pd
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from compeffdist_ray.sft import REQUIRED_COLUMNS, encode_rows, pack, training_steps

    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise UserError(f"training rows lack the column(s) {', '.join(missing)}; they have: "
                        f"{', '.join(map(str, rows.columns))}")
    check_resources(spec, ray.cluster_resources(), ray.nodes())

    # Tokenize on the driver: rows that cannot fit are counted before any worker starts, and the
    # step count (which the LR schedule needs) is known exactly.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    encoded, too_long = encode_rows(tokenizer, rows[list(REQUIRED_COLUMNS)].to_dict("records"), spec.max_length)
    order = epoch_order(len(encoded), spec.epochs, spec.seed)
    examples = [encoded[i] for i in order]
    if spec.packing:
        examples = pack(examples, spec.max_length)
    data = pd.DataFrame({"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]})
    if spec.packing:
        data["position_ids"] = [e["position_ids"] for e in examples]
    total_steps, micro_per_worker = training_steps(
        len(data), num_workers=spec.num_workers, micro_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps, max_steps=spec.max_steps)
    if total_steps < 1:
        need = spec.num_workers * spec.micro_batch_size * spec.gradient_accumulation_steps
        raise UserError(f"train: {len(data)} {'packed sequences' if spec.packing else 'usable examples'} "
                        f"({too_long} rows longer than train.max_length={spec.max_length}) make no optimizer step: "
                        f"one step needs {need} (train.num_workers x train.micro_batch_size x "
                        f"train.gradient_accumulation_steps); give more samples or lower those")

    from ray.data import ExecutionOptions

    exec_opts = ExecutionOptions(preserve_order=True)
    env = {"DS_ACCELERATOR": "cpu"} if not spec.use_gpu else {}
    env["TOKENIZERS_PARALLELISM"] = "false"
    for key in ("COMPEFFDIST_FAIL_AT_STEP", "COMPEFFDIST_FAIL_MARKER"):  # fault injection (tests only)
        if key in os.environ:
            env[key] = os.environ[key]
    resources = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    trainer = _trainer_class()(
        _worker_loop,
        train_loop_config={"spec": asdict(spec), "total_steps": total_steps, "micro_per_worker": micro_per_worker},
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=resources, placement_strategy=spec.placement_strategy),
        run_config=RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
        datasets={"train": ray.data.from_pandas(data)},
        dataset_config=DataConfig(execution_options=exec_opts),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training finished without reporting the exported model")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    ckpt.to_directory(out_dir)
    with open(os.path.join(out_dir, EXPORT_MARKER)) as f:
        meta = json.load(f)
    os.remove(os.path.join(out_dir, EXPORT_MARKER))
    history = meta["history"]
    return TrainResult(
        model_dir=out_dir, steps=int(meta["steps"]), history=history, examples=len(order), too_long=too_long,
        resumed_from_step=int(meta["resumed_from_step"]), train_tokens=int(sum(h["tokens"] for h in history)),
        wall_time_s=round(time.perf_counter() - t0, 2), worker_nodes=list(meta.get("worker_nodes", [])),
    )


def _trainer_class():
    """TorchTrainer without Ray 2.60's PlacementGroupCleaner.

    The cleaner asks the state API every second whether the train controller is alive and
    removes the workers' placement group when the answer comes back empty, which a loaded
    machine produces for a live controller: seen in CI, where it killed a healthy run mid-way
    ("Detected that the Ray Train controller actor ... is dead"). It only guards against a
    controller dying without cleanup; here the driver owns the run and `ray.shutdown` frees
    its placement groups.
    """
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks()
                    if type(cb).__name__ != "PlacementGroupCleanerCallback"]

    return Trainer


def history_frame(history: list[dict]):
    import pandas as pd

    return pd.DataFrame(history, columns=["step", "loss", "lr", "tokens", "time_s"])
