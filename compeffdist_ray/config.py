"""One typed config tree for the whole pipeline.

Defaults live in the dataclasses below and *are* the embedded default profile (the local demo:
SmolLM2-135M-Instruct as teacher and student, the bundled sample corpus, sizes that finish in
minutes on 2 cores). A YAML file overrides any subset of it; `key.path=value` arguments override
the YAML. Every unknown or mistyped key is reported with its dotted path, all in one error.

    >>> from compeffdist_ray.config import load_config
    >>> cfg = load_config(None, ["teacher.batch_size=4"])
    >>> cfg.teacher.batch_size
    4
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from compeffdist_ray.errors import UserError

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "config_to_dict",
    "dump_config",
    "BUILTIN_CORPUS",
]

BUILTIN_CORPUS = "builtin:sample-corpus"
_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(UserError):
    """The config has one or more problems; the message names each by dotted path."""


def _f(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None):
    """A dataclass field with its help text (shown by `compeffdist config show --help-keys`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class RayConfig:
    address: Optional[str] = _f(
        None, help="Ray cluster address; null runs ray.init() on this machine (local mode), or joins the job's "
                   "cluster when run as a Ray job (RAY_ADDRESS set)."
    )
    num_cpus: Optional[int] = _f(None, help="CPUs for a local Ray instance; null = all cores.")
    include_dashboard: bool = _f(False, help="Start the Ray dashboard in local mode.")
    progress_bars: bool = _f(True, help="Show Ray Data progress bars.")


@dataclass
class InputConfig:
    path: str = _f(
        BUILTIN_CORPUS,
        help=(
            "User texts: a local path or a pyarrow filesystem URI (s3://, gs://, file://); "
            f"'{BUILTIN_CORPUS}' is the corpus bundled with the package."
        ),
    )
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "text"] = _f(
        "auto", help="File format; 'auto' picks by extension (.jsonl .json .csv .parquet .txt)."
    )
    text_column: str = _f("text", help="Column (or JSON key) holding the user text.")
    id_column: Optional[str] = _f(
        "id", help="Column holding a stable text id; null or absent = ids made from the text hash."
    )


@dataclass
class OpenAIConfig:
    base_url: str = _f(
        "http://127.0.0.1:8000/v1", help="Base URL of an OpenAI-compatible API (ends with /v1)."
    )
    api_key_env: str = _f(
        "OPENAI_API_KEY", help="Environment variable holding the API key (may be unset for local servers)."
    )
    timeout_s: float = _f(120.0, help="Timeout of one HTTP request, in seconds.")
    max_retries: int = _f(4, help="Retries of a failed request (connection errors, 408/429/5xx).")
    backoff_s: float = _f(1.0, help="First retry delay; doubles each retry (with jitter).")
    max_concurrency: int = _f(8, help="Requests in flight at once from one actor.")


@dataclass
class VLLMConfig:
    tensor_parallel_size: int = _f(1, help="GPUs per model replica (tensor parallel).")
    pipeline_parallel_size: int = _f(1, help="Pipeline-parallel stages per replica.")
    max_model_len: int = _f(8192, help="Longest prompt + answer, in tokens.")
    gpu_memory_utilization: float = _f(0.9, help="Share of GPU memory vLLM may take.")
    accelerator_type: Optional[str] = _f(None, help="Ray accelerator type, e.g. H100; null = any.")
    engine_kwargs: dict[str, Any] = _f(
        help="Extra vLLM engine arguments passed through unchanged.", factory=dict
    )


@dataclass
class TeacherServeConfig:
    app_name: str = _f(
        "teacher",
        help="Name of the running Ray Serve teacher app (compeffdist serve teacher) that the pipeline's actors "
        "call through a deployment handle, on the same Ray cluster.",
    )


@dataclass
class TeacherConfig:
    backend: Literal["transformers", "vllm", "openai", "serve"] = _f(
        "transformers",
        help="Where generations come from: in-process transformers, Ray's vLLM processor, HTTP (openai), "
        "or a running Ray Serve teacher app called through its deployment handle (serve).",
    )
    model: str = _f(
        "smollm2-135m-instruct",
        help="Model alias (compeffdist models list), local path or Hugging Face id.",
    )
    served_model_name: Optional[str] = _f(
        None, help="Model name sent to an OpenAI-compatible server; null = `model`."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", help="Weights dtype: auto = bfloat16 on GPU, float32 on CPU."
    )
    chat_template_kwargs: dict[str, Any] = _f(
        help="Extra arguments of the chat template, e.g. {enable_thinking: false} for Qwen3.", factory=dict
    )
    max_new_tokens: int = _f(256, help="Longest answer, in tokens.")
    temperature: float = _f(0.0, help="Sampling temperature of the first attempt (0 = greedy).")
    retry_temperature: float = _f(0.7, help="Sampling temperature of retries after a bad answer.")
    top_p: float = _f(0.95, help="Nucleus sampling threshold when sampling.")
    repetition_penalty: float = _f(1.1, help="Repetition penalty (transformers and vLLM).")
    max_attempts: int = _f(3, help="Attempts per prompt until its answer parses; then it is dropped.")
    batch_size: int = _f(8, help="Prompts per batch handed to one actor.")
    concurrency: int = _f(1, help="Actors in the pool (model replicas).")
    num_cpus: float = _f(1.0, help="CPUs reserved per actor.")
    num_gpus: float = _f(0.0, help="GPUs per actor (transformers backend).")
    max_prompt_tokens: int = _f(
        3072, help="Prompts longer than this (in tokens) are cut from the left, and counted."
    )
    openai: OpenAIConfig = _f(help="Settings of the openai backend.", factory=OpenAIConfig)
    vllm: VLLMConfig = _f(help="Settings of the vllm backend.", factory=VLLMConfig)
    serve: TeacherServeConfig = _f(help="Settings of the serve backend.", factory=TeacherServeConfig)


@dataclass
class StudentConfig:
    model: str = _f(
        "smollm2-135m-instruct", help="Student model: alias, local path or Hugging Face id."
    )
    prompt_format: Literal["auto", "chat", "plain"] = _f(
        "auto",
        help="How (instruction, text) -> response is laid out for the student: 'chat' = the tokenizer's chat "
        "template (required); 'plain' = 'User: ...' / 'Assistant: ...' lines, for a model without a "
        "template; 'auto' = the template if the tokenizer has one, else plain for a base model of a known "
        "family (Llama, Mistral, Qwen, Gemma), else an error asking to choose.",
    )


@dataclass
class EmbeddingConfig:
    model: str = _f("all-minilm-l6-v2", help="sentence-transformers model: alias or path.")
    batch_size: int = _f(128, help="Texts per embedding batch.")
    device: Optional[str] = _f(None, help="Torch device; null = cuda if available, else cpu.")


@dataclass
class AttributesConfig:
    num_texts: int = _f(24, help="User texts the teacher enumerates attributes from (paper: 20K).")
    max_per_text: int = _f(12, help="Attributes kept per text at most.")
    max_words: int = _f(6, help="Attributes longer than this many words are dropped as malformed.")
    max_new_tokens: int = _f(96, help="Longest teacher answer for one text's attribute list.")


@dataclass
class PerspectivesConfig:
    attribute_list: Optional[str] = _f(
        None,
        help=(
            "Start from this attribute list (JSON list of {attr, count} or strings, or a text file, "
            "one per line) instead of the attributes stage output."
        ),
    )
    min_count: int = _f(1, help="Attributes seen fewer times than this are left out.")
    similarity: Literal["neg_sq_euclidean", "cosine"] = _f(
        "neg_sq_euclidean", help="Similarity for affinity propagation (paper: neg. sq. Euclidean)."
    )
    preference_percentile: float = _f(
        10.0,
        help="Base preference at this percentile (0-100) of the similarities; the paper used 0.5 on "
        "~1,800 attributes, a small attribute set needs a higher one to give several perspectives.",
    )
    frequency_weighting: Literal["preference", "duplicate", "none"] = _f(
        "preference",
        help=(
            "How frequent attributes count more: 'preference' raises their self-preference "
            "(fast), 'duplicate' repeats each point log1p(count) times (the paper's way, slow), "
            "'none'."
        ),
    )
    preference_weight: float = _f(
        0.05,
        help="With preference weighting: the preference shift per standard deviation of "
        "log-count, as a share of the similarity range.",
    )
    damping: float = _f(0.9, help="Affinity propagation damping (paper: 0.9).")
    max_iter: int = _f(1000, help="Affinity propagation iterations at most.")
    convergence_iter: int = _f(50, help="Stop after this many iterations without change.")
    max_points: int = _f(
        4000,
        help="Bound on points clustered at once (memory is O(n^2)); the most frequent are "
        "clustered, the rest assigned to the nearest exemplar.",
    )
    collapse_warning: int = _f(
        50, help="Warn of cluster collapse below this many perspectives when >= 1000 attributes."
    )


@dataclass
class TasksConfig:
    max_perspectives: Optional[int] = _f(
        4, help="Make tasks for the most frequent perspectives only; null = all of them."
    )
    tasks_per_perspective: int = _f(2, help="Tasks the teacher invents per perspective.")
    num_demonstrations: int = _f(3, help="Demonstrations per task (paper: 32).")
    max_new_tokens: int = _f(192, help="Longest teacher answer for one task definition.")
    demo_max_new_tokens: int = _f(64, help="Longest demonstration answer, in tokens.")


@dataclass
class PairingConfig:
    method: Literal["random", "attribute"] = _f(
        "random",
        help="'random' (the paper's default, balanced over tasks) or 'attribute' (texts go to "
        "tasks of the perspectives their attributes fall in; others fall back to random).",
    )
    num_texts: int = _f(96, help="User texts paired with instructions (paper: 100K).")
    exclude_demo_texts: bool = _f(True, help="Never pair a task with its own demonstration texts.")


@dataclass
class ResponsesConfig:
    max_new_tokens: int = _f(96, help="Longest teacher answer to one (instruction, text) pair.")
    demonstrations_in_prompt: Optional[int] = _f(
        None, help="Demonstrations of the task shown in the prompt; null = all of them (paper: 32)."
    )
    drop_truncated: bool = _f(
        False, help="Drop answers cut off at max_new_tokens (they are always flagged `truncated`)."
    )
    file: Optional[str] = _f(
        None,
        help="Bring your own answers: score, sample and train on the (instruction, text, response) rows "
        "of this jsonl/json/csv/parquet file (optional columns: task_id groups rows per instruction, "
        "pair_id) instead of asking the teacher; the stages before responses are then skipped.",
    )


@dataclass
class LoraConfig:
    """LoRA adapters through peft (off by default: the paper fine-tunes every weight)."""

    r: int = _f(0, help="LoRA rank; 0 = full fine-tuning. With r > 0 only the adapters train, and the "
                "export merges them into the weights (a plain model, servable as is).")
    alpha: float = _f(32.0, help="LoRA alpha: the adapters' update is scaled by alpha / r.")
    dropout: float = _f(0.05, help="Dropout on the adapters' input during training.")
    target_modules: str = _f(
        "all-linear",
        help="Modules that get adapters: 'all-linear' (every linear layer but the output head) or "
        "comma-separated module names, e.g. q_proj,v_proj.",
    )


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed settings shared by every training stage (warmup, finetune)."""

    num_workers: int = _f(1, help="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = _f(False, help="One GPU per worker (bf16); false trains on CPU (fp32, gloo).")
    cpus_per_worker: float = _f(
        1.0, help="CPUs reserved per worker; fractional on small machines so Ray Data keeps some."
    )
    gpus_per_worker: float = _f(1.0, help="GPUs per worker when use_gpu is true.")
    torch_threads: Optional[int] = _f(
        None,
        help="CPU training: torch threads per worker; null = in local mode this machine's cores shared by "
        "the workers (stages run one at a time), on a cluster cpus_per_worker rounded down (at least 1).",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _f(
        "PACK", help="How workers are placed on nodes (STRICT_SPREAD: one worker per node)."
    )
    storage_path: Optional[str] = _f(
        None,
        help="Where checkpoints go (local path or cloud URI, shared by all nodes); null = "
        "<run_dir>/_train. A rerun with the same settings resumes from the latest checkpoint.",
    )
    max_failures: int = _f(0, help="Worker-group restarts after a failure (Ray Train FailureConfig).")
    zero_stage: int = _f(2, help="DeepSpeed ZeRO stage, 0-3.")
    offload_optimizer: bool = _f(False, help="ZeRO 1-3: keep optimizer states in CPU memory.")
    offload_params: bool = _f(False, help="ZeRO 3: keep parameters in CPU memory.")
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", help="auto = bf16 on GPU, fp32 on CPU.")
    micro_batch_size: int = _f(4, help="Sequences per worker per forward pass.")
    gradient_accumulation_steps: int = _f(1, help="Micro-batches per optimizer step.")
    max_length: int = _f(2048, help="Longest training sequence in tokens; longer rows are dropped and counted.")
    lr: float = _f(2e-5, help="Peak learning rate (paper: 2e-5, full fine-tuning).")
    weight_decay: float = _f(0.01, help="AdamW weight decay (paper: 0.01).")
    betas: list[float] = _f(help="AdamW betas (paper: 0.9, 0.95).", factory=lambda: [0.9, 0.95])
    warmup_steps: int = _f(100, help="Linear LR warm-up steps (paper: 100), capped at a tenth of the run.")
    lr_schedule: Literal["cosine", "linear", "constant"] = _f("cosine", help="LR decay after warm-up.")
    gradient_clipping: float = _f(1.0, help="Max gradient norm; 0 = no clipping.")
    gradient_checkpointing: bool = _f(False, help="Recompute activations in the backward pass (less memory).")
    checkpoint_every: int = _f(50, help="Save a checkpoint every this many optimizer steps (and at the end).")
    keep_checkpoints: int = _f(2, help="Checkpoints kept (the latest ones).")
    lora: LoraConfig = _f(help="LoRA adapters (peft) instead of full fine-tuning.", factory=LoraConfig)


@dataclass
class WarmupConfig:
    enabled: bool = _f(
        True, help="Warm the student up before it scores difficulty; false scores with student.model."
    )
    num_samples: int = _f(32, help="Answered pairs drawn at random to warm up on (paper: a few thousand).")
    epochs: int = _f(1, help="Passes over the warm-up samples.")
    max_steps: Optional[int] = _f(None, help="Stop after this many optimizer steps; null = the epochs.")
    lr: Optional[float] = _f(None, help="Peak learning rate of the warm-up; null = train.lr.")


@dataclass
class FinetuneConfig:
    enabled: bool = _f(True, help="Fine-tune the student on the kept samples (stage finetune).")
    epochs: int = _f(1, help="Passes over the kept samples (paper: 1).")
    max_steps: Optional[int] = _f(None, help="Stop after this many optimizer steps; null = the epochs.")
    lr: Optional[float] = _f(None, help="Peak learning rate; null = train.lr.")
    packing: bool = _f(False, help="Pack consecutive samples into sequences of up to train.max_length tokens.")


@dataclass
class EvaluateConfig:
    data_dir: Optional[str] = _f(
        None, help="A SentiBench copy (<category>/<dataset>/{train,test}.json); null skips the evaluate stage."
    )
    datasets: list[str] = _f(help="Datasets to evaluate (sc/sst2 or sst2); empty: every usable one found.",
                             factory=list)
    k_shot: int = _f(8, help="Demonstrations per prompt, drawn from the train split (SentiBench: 8).")
    demos: Literal["shared", "per-example"] = _f(
        "shared", help="One draw of demonstrations per dataset, its prefix computed once (shared), or a fresh draw "
                       "per test example (per-example, the SentiBench reference scripts' way)."
    )
    limit: Optional[int] = _f(None, help="Only the first N test rows of each dataset; null = all of them.")
    base_student: bool = _f(True, help="Evaluate the base student (student.model) beside the distilled one.")
    teacher: bool = _f(
        False, help="Also evaluate the teacher: its model (transformers backend) or its endpoint (openai backend)."
    )
    max_new_tokens: int = _f(128, help="Token limit of an ABSA answer.")
    max_prompt_tokens: int = _f(4096, help="Longest prompt; demonstrations are dropped from the end to fit.")
    batch_size: int = _f(8, help="Prompts per forward pass or generate call.")
    concurrency: int = _f(1, help="Evaluation actors per model (one model load each).")
    num_cpus: Optional[float] = _f(None, help="CPUs per actor; null = 1 for a model, 0.25 for an endpoint.")
    num_gpus: float = _f(0.0, help="GPUs per actor (0 runs on CPU).")


@dataclass
class DifficultyConfig:
    top_p: float = _f(0.95, help="Nucleus of the rank-based difficulty (paper's code: 0.95).")
    batch_size: int = _f(32, help="Rows per batch handed to one scoring actor (rows of a task together).")
    concurrency: int = _f(1, help="Scoring actors (student replicas).")
    num_cpus: float = _f(1.0, help="CPUs reserved per scoring actor.")
    num_gpus: float = _f(0.0, help="GPUs per scoring actor.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", help="Student weights dtype: auto = bfloat16 on GPU, float32 on CPU."
    )
    prefix_reuse: bool = _f(True, help="Compute each instruction's shared prefix once per group (KV cache).")


@dataclass
class ProxyConfig:
    """The proxy difficulty model (stage 8) and proxy mode; model fields mirror `proxy.ProxyParams`."""

    enabled: bool = _f(
        False,
        help="Proxy mode: the teacher answers only seed_pairs random pairs; a proxy trained on their "
        "difficulty predicts it for every pair, sampling keeps pairs by prediction, and the teacher "
        "answers the kept pairs only (stage kept_responses). Saves the answers sampling would discard.",
    )
    seed_pairs: int = _f(64, help="Proxy mode: pairs answered and scored to train the proxy on.")
    backbone: Optional[str] = _f(
        None, help="Proxy backbone: alias/path (e.g. all-minilm-l6-v2); null = the warmed-up student."
    )
    pooling: Literal["auto", "last", "mean"] = _f(
        "auto", help="'last' token, 'mean' over tokens, or auto (last for decoders, mean for encoders)."
    )
    max_length: int = _f(1024, help="Tokens per (instruction, text) input; the instruction is shortened first.")
    head: Literal["ridge", "linear", "mlp"] = _f(
        "ridge", help="'ridge' (closed form, penalty by leave-one-out) or 'linear'/'mlp' trained with AdamW."
    )
    hidden_dim: int = _f(256, help="Hidden width of the 'mlp' head.")
    train_backbone: bool = _f(False, help="Fine-tune the backbone with the head (slow on CPU); false = frozen.")
    epochs: int = _f(100, help="Head training passes over cached features ('linear'/'mlp').")
    lr: float = _f(1e-3, help="Head learning rate ('linear'/'mlp', and while fine-tuning).")
    weight_decay: float = _f(0.01, help="AdamW weight decay of head and fine-tuned backbone.")
    train_batch_size: int = _f(32, help="Rows per optimiser step of the head / fine-tuning.")
    finetune_epochs: int = _f(1, help="Passes over the rows when train_backbone is true.")
    backbone_lr: float = _f(2e-5, help="Backbone learning rate when train_backbone is true.")
    eval_fraction: float = _f(0.2, help="Share of scored rows held out for Spearman / MAE, in (0, 0.5].")
    split: Literal["rows", "groups"] = _f(
        "rows", help="Hold out rows (new texts of known tasks, how the proxy is used) or whole tasks."
    )
    refit: bool = _f(True, help="After measuring, refit on all scored rows.")
    target: str = _f("rank_score", help="Difficulty column the proxy learns to predict.")
    batch_size: int = _f(32, help="Rows per forward pass when predicting.")
    prefix_reuse: bool = _f(True, help="Decoder backbones: compute each instruction's shared prompt prefix once.")
    concurrency: int = _f(1, help="Prediction actors.")
    num_cpus: float = _f(1.0, help="CPUs per prediction actor.")
    num_gpus: float = _f(0.0, help="GPUs per prediction actor.")


@dataclass
class FilteringConfig:
    proxy: ProxyConfig = _f(help="The proxy difficulty model and proxy mode.", factory=ProxyConfig)


@dataclass
class SamplingConfig:
    keep_ratio: float = _f(0.5, help="Share of each group's samples kept by difficulty sampling (paper: 0.5).")
    alpha: float = _f(
        0.5,
        help="Method 'rank_weighted': weight = rank^(-alpha), hardest rank 1; >= 0 (0 = uniform, "
        "large = nearly the hardest).",
    )
    grouping: Literal["per_instruction", "global"] = _f(
        "per_instruction", help="Rank within each instruction's group (default) or across all samples."
    )
    method: Literal["rank_weighted", "curve", "hardest", "random"] = _f(
        "rank_weighted",
        help=(
            "'rank_weighted' (the paper: draw without replacement with weight rank^(-alpha), "
            "hardest rank 1), 'curve' (the paper's public code: keep each row with a probability "
            "that is a curve of its difficulty position peaking at curve_a; the kept count is "
            "random around keep_ratio), 'hardest' (top-k by difficulty) or 'random' (uniform)."
        ),
    )
    curve_a: float = _f(
        1.0,
        help="Method 'curve': difficulty position (0 = easiest, 1 = hardest) kept most often, in "
        "(0, 1]; 1 keeps the harder samples more often, monotonically.",
    )
    score: str = _f(
        "rank_score",
        help="Difficulty column to sample by (higher = harder), written by the difficulty stage.",
    )


@dataclass
class ServeLimitsConfig:
    """What one request to a served model may ask for; more is refused with 413 / 422."""

    max_body_bytes: int = _f(1_000_000, help="Largest request body in bytes (Content-Length and the body read); "
                             "more is answered 413.")
    max_messages: int = _f(64, help="Chat messages per request at most (422 above).")
    max_tokens: int = _f(4096, help="Largest max_tokens a chat request may ask for (422 above).")
    max_batch_items: int = _f(256, help="(instruction, text) items per difficulty request at most (422 above).")


@dataclass
class ServeConfig:
    """Ray Serve apps for the teacher and the proxy difficulty model (compeffdist serve)."""

    host: str = _f("127.0.0.1", help="Address the Serve HTTP proxy listens on; 0.0.0.0 exposes it to the "
                   "network (keep the bearer token on, and TLS or a private network in front).")
    port: int = _f(8000, help="Port of the Serve HTTP proxy.")
    teacher_app_name: str = _f("teacher", help="Serve application name of the teacher (teacher.serve.app_name "
                               "must match for the pipeline's serve backend).")
    teacher_route_prefix: str = _f("/", help="Route prefix of the teacher app: its OpenAI base URL is "
                                   "http://HOST:PORT<prefix>/v1.")
    proxy_app_name: str = _f("proxy", help="Serve application name of the proxy difficulty model.")
    proxy_route_prefix: str = _f("/proxy", help="Route prefix of the proxy app: POST <prefix>/v1/difficulty.")
    num_replicas: int = _f(1, help="Replicas of each served model (each loads the model once).")
    max_ongoing_requests: int = _f(32, help="Requests one replica accepts at once; more wait in Serve's queue.")
    num_cpus: float = _f(1.0, help="CPUs reserved per replica.")
    num_gpus: float = _f(0.0, help="GPUs per replica (transformers teacher and proxy; vLLM takes "
                         "teacher.vllm.tensor_parallel_size GPUs).")
    max_batch_size: int = _f(8, help="Requests merged into one model batch at most (@serve.batch).")
    batch_wait_timeout_s: float = _f(0.05, help="How long a replica waits for more requests before running "
                                     "a batch that is not full, in seconds.")
    token_env: str = _f("COMPEFFDIST_SERVE_TOKEN", help="Environment variable holding the bearer token every "
                        "route but /health requires.")
    token_file: Optional[str] = _f(None, help="File holding the bearer token, used when the variable token_env "
                                   "is unset; null = 'compeffdist serve' generates one into "
                                   "<cache>/serve/token (mode 0600), Serve config files need one of the two.")
    limits: ServeLimitsConfig = _f(help="Request limits.", factory=ServeLimitsConfig)


@dataclass
class Config:
    """The whole pipeline's configuration."""

    run_dir: str = _f("runs/local-demo", help="Run directory: local path or pyarrow URI.")
    seed: int = _f(42, help="Seed of every random choice in the pipeline.")
    ray: RayConfig = _f(help="Ray runtime.", factory=RayConfig)
    input: InputConfig = _f(help="Where user texts come from.", factory=InputConfig)
    teacher: TeacherConfig = _f(help="The teacher LLM and its backend.", factory=TeacherConfig)
    student: StudentConfig = _f(help="The student model.", factory=StudentConfig)
    embedding: EmbeddingConfig = _f(help="Sentence embeddings.", factory=EmbeddingConfig)
    attributes: AttributesConfig = _f(help="Stage 1: attributes.", factory=AttributesConfig)
    perspectives: PerspectivesConfig = _f(help="Stage 2: perspectives.", factory=PerspectivesConfig)
    tasks: TasksConfig = _f(help="Stage 3: tasks.", factory=TasksConfig)
    pairing: PairingConfig = _f(help="Stage 4: pairing.", factory=PairingConfig)
    responses: ResponsesConfig = _f(help="Stage 5: teacher responses.", factory=ResponsesConfig)
    train: TrainConfig = _f(help="Ray Train + DeepSpeed, shared by the training stages.", factory=TrainConfig)
    warmup: WarmupConfig = _f(help="Stage 6: the student's brief warm-up fine-tuning.", factory=WarmupConfig)
    difficulty: DifficultyConfig = _f(help="Stage 7: difficulty scoring by the warmed-up student.", factory=DifficultyConfig)
    filtering: FilteringConfig = _f(help="Stage 8: the proxy difficulty model (proxy mode).", factory=FilteringConfig)
    sampling: SamplingConfig = _f(help="Stage 9: difficulty-prioritised sampling.", factory=SamplingConfig)
    finetune: FinetuneConfig = _f(help="Stage 11: the student fine-tuned on the kept samples.", factory=FinetuneConfig)
    evaluate: EvaluateConfig = _f(help="Stage 12: SentiBench for the base and distilled students (and the teacher).",
                                  factory=EvaluateConfig)
    serve: ServeConfig = _f(help="Ray Serve apps for the teacher and the proxy (compeffdist serve).", factory=ServeConfig)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is dict:
        return "a mapping"
    if origin is list:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the (lightly coerced) value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return tp()
        return _build(tp, value, path, errors)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sub: list[str] = []
        out = _coerce(value, inner[0], path, sub)
        if sub:
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return out
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {value!r}")
            return []
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            # YAML 1.1 reads `1e-4` (no dot) as a string; a float field takes it as the number it is.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            close = _closest(str(key), names)
            hint = f" (did you mean '{close}'?)" if close else ""
            errors.append(f"{where}: unknown key{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], where, errors)
    return cls(**kwargs)


def _closest(word: str, options: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.75)
    return match[0] if match else None


def _check_values(cfg: Config, errors: list[str]) -> None:
    """Range checks that types alone cannot express."""

    def positive(path: str, value: float) -> None:
        if isinstance(value, (int, float)) and value <= 0:
            errors.append(f"{path}: must be > 0, got {value!r}")

    for path in (
        "teacher.max_new_tokens",
        "teacher.max_attempts",
        "teacher.batch_size",
        "teacher.concurrency",
        "teacher.max_prompt_tokens",
        "teacher.openai.max_concurrency",
        "teacher.openai.timeout_s",
        "teacher.vllm.tensor_parallel_size",
        "teacher.vllm.pipeline_parallel_size",
        "embedding.batch_size",
        "attributes.num_texts",
        "attributes.max_per_text",
        "attributes.max_new_tokens",
        "tasks.max_new_tokens",
        "attributes.max_words",
        "perspectives.max_iter",
        "perspectives.convergence_iter",
        "perspectives.max_points",
        "tasks.tasks_per_perspective",
        "tasks.num_demonstrations",
        "tasks.demo_max_new_tokens",
        "pairing.num_texts",
        "responses.max_new_tokens",
        "difficulty.batch_size",
        "difficulty.concurrency",
        "train.num_workers",
        "train.cpus_per_worker",
        "train.micro_batch_size",
        "train.gradient_accumulation_steps",
        "train.max_length",
        "train.lr",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "warmup.num_samples",
        "filtering.proxy.seed_pairs",
        "filtering.proxy.max_length",
        "filtering.proxy.hidden_dim",
        "filtering.proxy.epochs",
        "filtering.proxy.lr",
        "filtering.proxy.train_batch_size",
        "filtering.proxy.finetune_epochs",
        "filtering.proxy.backbone_lr",
        "filtering.proxy.batch_size",
        "filtering.proxy.concurrency",
        "warmup.epochs",
        "finetune.epochs",
    ):
        positive(path, get_path(cfg, path))
    if not 0.0 < cfg.sampling.keep_ratio <= 1.0:
        errors.append(f"sampling.keep_ratio: must be in (0, 1], got {cfg.sampling.keep_ratio!r}")
    if not 0.0 < cfg.difficulty.top_p <= 1.0:
        errors.append(f"difficulty.top_p: must be in (0, 1], got {cfg.difficulty.top_p!r}")
    if not cfg.sampling.alpha >= 0.0:
        errors.append(f"sampling.alpha: must be >= 0, got {cfg.sampling.alpha!r}")
    if not 0.0 < cfg.sampling.curve_a <= 1.0:
        errors.append(f"sampling.curve_a: must be in (0, 1], got {cfg.sampling.curve_a!r}")
    if not cfg.sampling.score:
        errors.append("sampling.score: must name a difficulty column, got ''")
    if cfg.tasks.max_perspectives is not None:
        positive("tasks.max_perspectives", cfg.tasks.max_perspectives)
    if cfg.responses.demonstrations_in_prompt is not None and cfg.responses.demonstrations_in_prompt < 0:
        errors.append("responses.demonstrations_in_prompt: must be >= 0 or null, got "
                      f"{cfg.responses.demonstrations_in_prompt!r}")
    if not 0.5 <= cfg.perspectives.damping < 1.0:
        errors.append(f"perspectives.damping: must be in [0.5, 1), got {cfg.perspectives.damping!r}")
    if not 0.0 <= cfg.perspectives.preference_percentile <= 100.0:
        errors.append(
            "perspectives.preference_percentile: must be in [0, 100], got "
            f"{cfg.perspectives.preference_percentile!r}"
        )
    for path in ("teacher.temperature", "teacher.retry_temperature", "teacher.openai.max_retries"):
        value = get_path(cfg, path)
        if isinstance(value, (int, float)) and value < 0:
            errors.append(f"{path}: must be >= 0, got {value!r}")
    if not 0.0 < cfg.teacher.top_p <= 1.0:
        errors.append(f"teacher.top_p: must be in (0, 1], got {cfg.teacher.top_p!r}")
    if cfg.teacher.num_cpus < 0 or cfg.teacher.num_gpus < 0:
        errors.append("teacher.num_cpus / teacher.num_gpus: must be >= 0")
    if not 0 <= cfg.train.zero_stage <= 3:
        errors.append(f"train.zero_stage: DeepSpeed ZeRO stages are 0, 1, 2 and 3, got {cfg.train.zero_stage!r}")
    if cfg.train.lora.r < 0:
        errors.append(f"train.lora.r: the LoRA rank must be 0 (off) or positive, got {cfg.train.lora.r!r}")
    if not 0.0 <= cfg.train.lora.dropout < 1.0:
        errors.append(f"train.lora.dropout: must be in [0, 1), got {cfg.train.lora.dropout!r}")
    if cfg.train.lora.r > 0 and not cfg.train.lora.target_modules.strip(", "):
        errors.append("train.lora.target_modules: empty; use all-linear or module names such as q_proj,v_proj")
    if cfg.train.offload_params and cfg.train.zero_stage != 3:
        errors.append("train.offload_params: parameter offload needs train.zero_stage=3")
    if cfg.train.offload_optimizer and cfg.train.zero_stage == 0:
        errors.append("train.offload_optimizer: optimizer offload needs train.zero_stage 1, 2 or 3")
    if len(cfg.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        errors.append(f"train.betas: must be two numbers in [0, 1), got {cfg.train.betas!r}")
    for path in ("train.weight_decay", "train.warmup_steps", "train.gradient_clipping", "train.max_failures"):
        value = get_path(cfg, path)
        if isinstance(value, (int, float)) and value < 0:
            errors.append(f"{path}: must be >= 0, got {value!r}")
    if cfg.train.torch_threads is not None and cfg.train.torch_threads < 1:
        errors.append(f"train.torch_threads: must be >= 1 or null, got {cfg.train.torch_threads!r}")
    if cfg.train.use_gpu and cfg.train.gpus_per_worker <= 0:
        errors.append(f"train.gpus_per_worker: must be > 0 with train.use_gpu, got {cfg.train.gpus_per_worker!r}")
    if not 0.0 < cfg.filtering.proxy.eval_fraction <= 0.5:
        errors.append(f"filtering.proxy.eval_fraction: must be in (0, 0.5], got {cfg.filtering.proxy.eval_fraction!r}")
    if cfg.filtering.proxy.weight_decay < 0:
        errors.append(f"filtering.proxy.weight_decay: must be >= 0, got {cfg.filtering.proxy.weight_decay!r}")
    if cfg.responses.file and cfg.filtering.proxy.enabled:
        errors.append("filtering.proxy.enabled: proxy mode predicts difficulty for pairs the teacher has not "
                      "answered yet; with responses.file every row is answered already: set one or the other")
    for path in ("warmup.max_steps", "warmup.lr", "finetune.max_steps", "finetune.lr"):
        value = get_path(cfg, path)
        if value is not None:
            positive(path, value)
    if not cfg.input.text_column:
        errors.append("input.text_column: must not be empty")
    e = cfg.evaluate
    for path, low in (("evaluate.k_shot", 0), ("evaluate.max_new_tokens", 1), ("evaluate.max_prompt_tokens", 16),
                      ("evaluate.batch_size", 1), ("evaluate.concurrency", 1)):
        value = get_path(cfg, path)
        if isinstance(value, int) and value < low:
            errors.append(f"{path}: must be >= {low}, got {value!r}")
    if isinstance(e.limit, int) and e.limit < 1:
        errors.append(f"evaluate.limit: must be a positive number of rows or null (all), got {e.limit!r}")
    if (isinstance(e.num_cpus, (int, float)) and e.num_cpus < 0) or (isinstance(e.num_gpus, (int, float))
                                                                      and e.num_gpus < 0):
        errors.append("evaluate.num_cpus / evaluate.num_gpus: must be >= 0")
    _check_serve(cfg, errors)


def _check_serve(cfg: Config, errors: list[str]) -> None:
    s = cfg.serve
    for path in ("serve.num_replicas", "serve.max_ongoing_requests", "serve.max_batch_size",
                 "serve.limits.max_body_bytes", "serve.limits.max_messages", "serve.limits.max_tokens",
                 "serve.limits.max_batch_items"):
        value = get_path(cfg, path)
        if isinstance(value, int) and value <= 0:
            errors.append(f"{path}: must be > 0, got {value!r}")
    if isinstance(s.port, int) and not 1 <= s.port <= 65535:
        errors.append(f"serve.port: must be a TCP port in 1-65535, got {s.port!r}")
    if not s.host:
        errors.append("serve.host: must not be empty (127.0.0.1 for this machine only, 0.0.0.0 for every interface)")
    for path in ("serve.batch_wait_timeout_s", "serve.num_cpus", "serve.num_gpus"):
        value = get_path(cfg, path)
        if isinstance(value, (int, float)) and value < 0:
            errors.append(f"{path}: must be >= 0, got {value!r}")
    for path in ("serve.teacher_route_prefix", "serve.proxy_route_prefix"):
        value = get_path(cfg, path)
        if isinstance(value, str) and (not value.startswith("/") or (len(value) > 1 and value.endswith("/"))):
            errors.append(f"{path}: a route prefix starts with '/' and does not end with one (e.g. / or /proxy), "
                          f"got {value!r}")
    if s.teacher_app_name == s.proxy_app_name:
        errors.append(f"serve.proxy_app_name: must differ from serve.teacher_app_name, both are {s.proxy_app_name!r}")
    if s.teacher_route_prefix == s.proxy_route_prefix:
        errors.append(f"serve.proxy_route_prefix: must differ from serve.teacher_route_prefix, both are "
                      f"{s.proxy_route_prefix!r}")
    if not s.token_env:
        errors.append("serve.token_env: must name an environment variable (default COMPEFFDIST_SERVE_TOKEN)")
    if not cfg.teacher.serve.app_name:
        errors.append("teacher.serve.app_name: must name the Serve app of the teacher (default 'teacher')")


def get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """Turn `a.b=1` strings into a nested dict; values are parsed as YAML scalars."""
    import yaml

    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (give an existing YAML file to --config)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top, got {type(data).__name__}")
    return data


def config_from_dict(data: dict) -> Config:
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if not errors:
        _check_values(cfg, errors)
    if errors:
        raise ConfigError(f"invalid config ({len(errors)} problem{'s' if len(errors) > 1 else ''}): " + "; ".join(errors))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (if any) <- dotted overrides, validated once at the end."""
    data = read_yaml(path) if path else {}
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return config_from_dict(data)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def iter_help(cls: type = Config, prefix: str = ""):
    """Yield (dotted key, type name, default, help) for every leaf of the tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        where = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_help(tp, where)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield where, _type_name(tp), default, f.metadata.get("help", "")
