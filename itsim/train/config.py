"""`itsim train`'s configuration: one dataclass (flags, YAML/TOML files and the saved copy derive from it)
and the learning-rate schedule, a pure function of the step."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from itsim.config import secret_field
from itsim.model import ModelConfig


@dataclass
class TrainConfig:
    shards: str = field(default="", metadata={
        "help": "shard folder written by `itsim build-shards`: a local path or a store URL (s3://bucket/shards)"})
    out: str = field(default="runs/train", metadata={
        "help": "run folder (checkpoints, metrics, model): a local path, or a store URL (s3://bucket/run) that "
                "gets the same layout, written through --stage-dir"})
    stage_dir: str = field(default="", metadata={
        "help": "with a URL --out: the local folder each process writes the run into before uploading it "
                "(a rank<N> folder per process); '' = a temporary folder under $TMPDIR. Removed when the run "
                "ends well, kept (and named) when an upload failed"})
    storage_options: dict | None = secret_field(None, "JSON object of store settings for URL --shards/--out "
                                                "(endpoint_url, ...); merged over $ITSIM_STORAGE_OPTIONS; "
                                                "never printed or saved")
    steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = derive from --epochs"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the train images when --steps is 0"})
    batch_size: int = field(default=64, metadata={"help": "images per batch per process"})
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = field(default=0.05, metadata={"help": "cosine schedule floor, as a fraction of --lr"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 = off"})
    grad_accum: int = 1
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "auto = bf16 on GPU, no (fp32) on CPU"})
    pairs: Literal["balanced", "in-batch"] = field(default="balanced", metadata={"help": "how to form true/false pairs"})
    negatives: Literal["random", "hard", "itc"] = field(default="random", metadata={
        "help": "in-batch negatives: random, hard (highest head logits) or itc (drawn in proportion to the "
                "softmax of the contrastive similarities, as ALBEF; needs --contrastive-dim)"})
    negatives_k: int = field(default=7, metadata={"help": "negative captions per image (in-batch)"})
    captions_per_image: int = field(default=0, metadata={
        "help": "captions per image per step: 0 = all of them (every image-caption pair, one CNN pass), N = N random"})
    label_smoothing: float = 0.0
    itc_weight: float = field(default=0.0, metadata={
        "help": "weight of the symmetric InfoNCE loss over the batch beside the head's BCE (needs --contrastive-dim)"})
    word_dropout: float = field(default=0.0, metadata={"help": "probability a caption token becomes <unk> in training"})
    augment: str = field(default="", metadata={
        "help": "comma list of crop,flip,rrc (random resized crop),jitter (colour) ('' = none)"})
    checkpoint_every: int = 250
    keep: int = field(default=3, metadata={"help": "checkpoints kept"})
    eval_every: int = field(default=250, metadata={"help": "validate every N steps (0 = only at the end)"})
    log_every: int = field(default=10, metadata={
        "help": "log every N steps; metrics are read from the device (a host sync) and a SIGTERM/SIGINT is "
                "acted on only at these steps, so a stop request ends the run within N steps"})
    val_split: str = "val"
    val_max_images: int = 1000
    resume: str = field(default="", metadata={"help": "'auto' (newest complete checkpoint) or a checkpoint path"})
    seed: int = 0
    workers: int = field(default=2, metadata={
        "help": "DataLoader worker processes per rank (with --data-on-device: threads decoding the split once)"})
    threads: int = field(default=0, metadata={
        "help": "CPU compute threads per rank; 0 = OMP_NUM_THREADS if set, else the CPUs / local ranks"})
    shuffle_buffer: int = 1000
    data_on_device: bool = field(default=False, metadata={
        "help": "decode the train split once into device memory (uint8; RAM on CPU) and draw and augment batches "
                "there; refused when it exceeds --device-memory-gb. Default: stream from the shards"})
    device_memory_gb: float = field(default=0.0, metadata={
        "help": "memory budget of --data-on-device; 0 = 60%% of the GPU's free memory (CUDA) or of the available "
                "RAM shared by the local ranks (CPU)"})
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm across GPUs"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the image encoder and head"})
    dist_timeout: int = field(default=600, metadata={"help": "seconds before a stuck collective fails"})
    report_to: str = field(default="auto", metadata={
        "help": "experiment trackers: auto (TensorBoard when installed), tensorboard, wandb, mlflow, all, none, "
                "or a comma list; a tracker that fails only warns"})
    tensorboard: bool | None = field(default=None, metadata={
        "help": "alias kept from earlier versions: --tensorboard adds TensorBoard to --report-to, "
                "--no-tensorboard removes it"})
    audit: bool = field(default=False, metadata={
        "help": "each rank writes the sample keys it trained on and a parameter checksum to RUN/audit/"})
    # Model sizes (defaults: the reference design).
    channels: tuple[int, ...] = (32, 64, 128, 256)
    cnn_dropout: float = 0.2
    image_dim: int = 512
    embed_dim: int = 128
    lstm_hidden: int = 128
    lstm_layers: int = 3
    lstm_dropout: float = 0.2
    text_dim: int = 256
    head_dim: int = 256
    head_dropout: float = 0.3
    fusion: Literal["concat", "concat_product"] = field(
        default="concat", metadata={"help": "head input: concat (reference) or concat_product"})
    channels_last: bool = False
    text_pool: Literal["last", "mean", "max"] = field(default="last", metadata={
        "help": "caption vector: last LSTM states (reference) or mean/max over all outputs"})
    contrastive_dim: int = field(default=0, metadata={
        "help": "shared size of the contrastive projections of both vectors (0 = none, the reference)"})

    def model_config(self, vocab_size: int) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(vocab_size=vocab_size, **{k: v for k, v in dataclasses.asdict(self).items() if k in names
                                                     and k != "vocab_size"})


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up then cosine decay to `min_lr_ratio`; a pure function of the step (nothing to save)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
