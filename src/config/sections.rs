//! The raw TOML sections as serde reads them, each key with its default.
//! Nothing here checks values: [`super::validate`] does, once, for the whole
//! file, and only a validated [`super::Config`] leaves [`super::Config::load`].

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The LoRA target modules that llama / mistral / qwen2 decoders have.
pub const KNOWN_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeName {
    F32,
    Bf16,
    F16,
}

impl DTypeName {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            DTypeName::F32 => candle_core::DType::F32,
            DTypeName::Bf16 => candle_core::DType::BF16,
            DTypeName::F16 => candle_core::DType::F16,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Local HF-format directory, or a Hub repo id such as "Qwen/Qwen2.5-0.5B".
    pub path: String,
    /// Hub revision (branch, tag or commit) when `path` is a repo id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Weight dtype; losses, softmax and optimizer state are always f32.
    #[serde(default = "default_dtype")]
    pub dtype: DTypeName,
    /// cpu | cuda | cuda:N | metal
    #[serde(default = "default_device")]
    pub device: String,
    /// CPU threads for candle's kernels (sets RAYON_NUM_THREADS unless the
    /// environment already does). Tiny models run faster on 1: per-op
    /// fan-out costs more than it saves, and badly so on a busy machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<usize>,
    /// If set and `path` has no weights yet, `init-tiny` creates the embedded
    /// tiny model and data in this directory first (offline default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_tiny: Option<PathBuf>,
    /// Frozen base weights in a ggml block format (LoRA only): `keep` a
    /// GGUF's own quantised tensors, or quantise the projections at load.
    #[serde(default, skip_serializing_if = "Quantize::is_none")]
    pub quantize: Quantize,
}

/// `model.quantize`: how the frozen base is held ([`crate::model::quant`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quantize {
    /// Dense in `model.dtype` (a GGUF is dequantised at load).
    #[default]
    #[serde(rename = "none")]
    None,
    /// A GGUF's block-format tensors as stored: projections, the embedding
    /// table and a tied (or quantised) head.
    #[serde(rename = "keep")]
    Keep,
    /// The seven projections of every layer quantised at load.
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
    #[serde(rename = "q4k")]
    Q4K,
}

impl std::fmt::Display for Quantize {
    /// The TOML spelling, for logs and errors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quantize::None => "none",
            Quantize::Keep => "keep",
            Quantize::Q8_0 => "q8_0",
            Quantize::Q4_0 => "q4_0",
            Quantize::Q4K => "q4k",
        })
    }
}

impl Quantize {
    pub fn is_none(&self) -> bool {
        *self == Quantize::None
    }

    /// The block format to quantise the projections to at load.
    pub fn ggml(self) -> Option<candle_core::quantized::GgmlDType> {
        use candle_core::quantized::GgmlDType;
        match self {
            Quantize::Q8_0 => Some(GgmlDType::Q8_0),
            Quantize::Q4_0 => Some(GgmlDType::Q4_0),
            Quantize::Q4K => Some(GgmlDType::Q4K),
            Quantize::None | Quantize::Keep => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A local `.jsonl` / `.json` / `.parquet` file, or a Hub dataset
    /// `hf://owner/name[/config]/split`.
    pub train: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<String>,
    #[serde(default = "default_prompt_field")]
    pub prompt_field: String,
    #[serde(default = "default_response_field")]
    pub response_field: String,
    /// Several fields joined by a newline (empty ones skipped) form the
    /// prompt instead of `prompt_field`, e.g. `["instruction", "input"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_fields: Vec<String>,
    /// Use only the first N records of each source (e.g. NuminaMath's 3,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Rows holding an array here are chats (`role` / `content` messages;
    /// roles `human` / `bot` / `gpt` read as user / assistant). With
    /// `chat_template` they are rendered with the model's chat template;
    /// without, a single user/assistant exchange (optionally after a system
    /// message) becomes a prompt/response pair formatted with `template`.
    #[serde(default = "default_messages_field")]
    pub messages_field: String,
    /// Also render prompt/response rows as a user/assistant chat with the
    /// model's chat template (instruct and R1-distill models), instead of
    /// `template`.
    #[serde(default)]
    pub chat_template: bool,
    /// System message prepended to chats built from prompt/response rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The prompt part; `{prompt}` is replaced by the prompt field.
    #[serde(default = "default_template")]
    pub template: String,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Pack each micro-batch's examples first-fit into rows of up to
    /// `max_seq_len` tokens (positions restart per example, block-diagonal
    /// causal mask): less padding, same examples, loss and mask per step.
    /// The XTF scoring pass and eval always run unpacked.
    #[serde(default)]
    pub packing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Lora,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default = "default_method")]
    pub method: Method,
    #[serde(default = "one")]
    pub epochs: usize,
    /// Overrides `epochs` when set: stop after this many optimizer steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    #[serde(default = "default_micro_batch")]
    pub micro_batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Decoupled (AdamW) decay; never applied to norms or biases.
    #[serde(default)]
    pub weight_decay: f64,
    /// Global-norm clipping; 0 disables it.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Evaluate every N optimizer steps (and always after the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<usize>,
    /// Write a resumable checkpoint every N optimizer steps (`--resume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_steps: Option<usize>,
    /// Append a metrics line every N optimizer steps.
    #[serde(default = "one")]
    pub log_steps: usize,
    /// Keep only each decoder layer's input in the forward and recompute the
    /// layer in backward: activation memory of one layer instead of all, for
    /// about one more forward per step; gradients are unchanged.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Stop with an error after this many consecutive steps whose loss or
    /// gradient norm is not finite (each is skipped: no update).
    #[serde(default = "default_max_skipped")]
    pub max_skipped_steps: usize,
    /// ZeRO stage with several ranks: 0 = plain data parallel (every rank
    /// keeps all optimizer state), 2 = each rank keeps AdamW state, master
    /// weights and summed gradients only for the parameters it owns.
    #[serde(default)]
    pub zero: u8,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    /// LoRA only: also write merged full weights to `dir/merged`.
    #[serde(default)]
    pub merge: bool,
    /// TensorBoard scalars under `dir/tensorboard/` ([`crate::train::tensorboard`]).
    #[serde(default = "yes")]
    pub tensorboard: bool,
}

/// `[xtf]`: token-level noise filtering (see ../shared/xtf-spec.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XtfSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Whose defaults the other `[xtf]` keys take (spec: "the authors'
    /// variant"); keys set in the file always win. Applied in [`Config::parse`].
    #[serde(default)]
    pub preset: Preset,
    #[serde(default = "default_xtf_batch")]
    pub batch_size: usize,
    #[serde(default)]
    pub protect_eos: bool,
    #[serde(default)]
    pub ri: RiSection,
    #[serde(default)]
    pub kn: KnSection,
    #[serde(default)]
    pub tr: TrSection,
}

/// `xtf.preset`: the paper's dataset-level rules, or the defaults of the
/// authors' released code (per-example caps and fences; docs/xtf.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    #[default]
    Paper,
    Authors,
}

/// The `[xtf]` defaults a preset sets, as dotted keys below `xtf`.
/// `"authors"`: github EonHao/XTF @ bd83b19 (`XTF_script.py`,
/// `utils/ScoreR.py`); every point is listed in docs/xtf.md.
pub fn preset_defaults(preset: Preset) -> Vec<(&'static str, toml::Value)> {
    match preset {
        Preset::Paper => Vec::new(),
        Preset::Authors => vec![
            ("ri.scope", "example".into()),
            ("ri.iqr_factor", 1.5.into()),
            ("ri.max_share", 0.05.into()),
            ("kn.max_share", 0.10.into()),
            ("protect_eos", true.into()),
            ("tr.classes", 5.into()),
            ("tr.rule", "below_cut".into()),
            ("tr.cut_share", 1.0.into()),
            ("tr.embedding", "final_hidden".into()),
            ("tr.max_share", 0.05.into()),
        ],
    }
}

/// `xtf.ri.scope`: where the RI fence's quartiles are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RiScope {
    /// Over all label tokens of the training set (the paper).
    #[default]
    Dataset,
    /// Over each example's own label tokens (the authors' code).
    Example,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiReduce {
    ReceivedMean,
    ReceivedRelative,
}

/// `"all"` or a list of layer indices (negative counts from the end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    Named(String),
    List(Vec<i64>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_reduce")]
    pub reduce: RiReduce,
    #[serde(default = "default_layers")]
    pub layers: Layers,
    #[serde(default = "default_iqr")]
    pub iqr_factor: f64,
    #[serde(default)]
    pub scope: RiScope,
    /// Per-example cap: at most `floor(n · max_share)` flagged tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_share: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_kn_threshold")]
    pub threshold: f64,
    /// Per-example cap: at most `floor(n · max_share)` flagged tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_share: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    Cosine,
    Euclidean,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_distance")]
    pub distance: Distance,
    #[serde(default = "default_classes")]
    pub classes: usize,
    #[serde(default = "one")]
    pub filter_class: usize,
    /// Which tokens of the Multi-Otsu classes are flagged.
    #[serde(default)]
    pub rule: TrRule,
    /// `rule = "below_cut"`: the authors' `r`, the cumulative share of
    /// tokens at or above the thresholds past which the cut stops.
    #[serde(default = "one_f64")]
    pub cut_share: f64,
    /// The token vectors `E(t)`.
    #[serde(default)]
    pub embedding: TrEmbedding,
    /// The domain vector from these words instead of the training data:
    /// the mean over words of the mean vector of each word's tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_words: Option<Vec<String>>,
    /// Per-example cap: at most `floor(n · max_share)` flagged tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_share: Option<f64>,
}

/// `xtf.tr.rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrRule {
    /// Flag Multi-Otsu class `filter_class` (the paper; spec default).
    #[default]
    Class,
    /// Flag every token below one threshold, chosen by the authors' code's
    /// cumulative rule with `cut_share` (docs/xtf.md).
    BelowCut,
}

/// `xtf.tr.embedding`: what `E(t)` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrEmbedding {
    /// The input embedding row (the paper; spec default).
    #[default]
    Input,
    /// The base model's final (normed) hidden state for the token run
    /// alone as a one-token sequence (the authors' code); for domain words,
    /// the word's tokens run as one sequence, averaged over its positions.
    FinalHidden,
}

/// `[mask]`: which label tokens the loss counts (one interface, several
/// strategies; the paper's baselines are strategies here).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSection {
    #[serde(default = "default_strategy")]
    pub strategy: Strategy,
    /// Reference model for `slm`, `token_clean` and `data_filter`: a PEFT
    /// adapter directory (applied to `model.path`), a full HF model
    /// directory, or a Hub repo id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Share kept: tokens per micro-batch (`slm`, Rho-1's k), tokens
    /// (`token_clean`'s data_prop) or examples (`data_filter`).
    #[serde(default = "default_keep_ratio")]
    pub keep_ratio: f64,
    /// `token_clean`: rank tokens over the whole dataset or within each example.
    #[serde(default = "default_scope")]
    pub scope: Scope,
    /// `sidecar`: JSONL, one line per training example, over its label
    /// tokens (response + EOS): an array or `{"mask": [...]}` /
    /// `{"weights": [...]}` of 0/1 or float weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Every label token (ordinary fine-tuning).
    None,
    /// XTF (`[xtf]` section, defaults if absent).
    Xtf,
    /// Rho-1 selective language modelling: top `keep_ratio` excess loss
    /// `L_train - L_ref` of each micro-batch, recomputed every step.
    Slm,
    /// Token Cleaning: top `keep_ratio` of `L_base - L_ref`.
    TokenClean,
    /// Sample level: keep the top `keep_ratio` examples by mean `L_base - L_ref`.
    DataFilter,
    /// Per-token weights read from `sidecar`.
    Sidecar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Dataset,
    Sample,
}

/// `[eval]`: generation-based benchmarks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Run the tasks after training (`xtf-train --config` / `train`).
    #[serde(default = "yes")]
    pub after_train: bool,
    /// Prompts generated together.
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    pub tasks: Vec<EvalTask>,
}

/// One benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalTask {
    pub name: TaskKind,
    /// The benchmark: a local file (PubMedQA: `ori_pqal.json`, with
    /// `test_ground_truth.json` beside it) or a Hub dataset `hf://...`.
    pub path: String,
    /// Evaluate only the first N problems.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Prompt format; default `data.template` (`"{prompt}"` for humaneval).
    /// Ignored when `data.chat_template` is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Samples per problem (pass@k needs n >= k).
    #[serde(default = "one")]
    pub n_samples: usize,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub stop: Vec<String>,
    /// pass@k values reported (humaneval).
    #[serde(default = "default_pass_k")]
    pub k: Vec<usize>,
    /// Wall-clock limit per program in seconds (humaneval).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    #[serde(default)]
    pub seed: u64,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_dtype() -> DTypeName {
    DTypeName::F32
}
fn default_device() -> String {
    "cpu".into()
}
fn default_prompt_field() -> String {
    "prompt".into()
}
fn default_response_field() -> String {
    "response".into()
}
fn default_messages_field() -> String {
    "messages".into()
}
fn default_strategy() -> Strategy {
    Strategy::None
}
fn default_keep_ratio() -> f64 {
    0.6
}
fn default_scope() -> Scope {
    Scope::Dataset
}
fn default_eval_batch() -> usize {
    8
}
fn default_max_new_tokens() -> usize {
    512
}
fn default_pass_k() -> Vec<usize> {
    vec![1, 5, 10]
}
fn default_timeout() -> f64 {
    3.0
}
fn default_template() -> String {
    "{prompt}\n".into()
}
fn default_max_seq_len() -> usize {
    512
}
fn default_method() -> Method {
    Method::Lora
}
fn default_max_skipped() -> usize {
    3
}
fn default_micro_batch() -> usize {
    4
}
fn default_lr() -> f64 {
    2e-4
}
fn default_schedule() -> Schedule {
    Schedule::Cosine
}
fn default_clip() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    42
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<String> {
    KNOWN_MODULES.iter().map(|s| s.to_string()).collect()
}
fn default_xtf_batch() -> usize {
    8
}
fn default_reduce() -> RiReduce {
    RiReduce::ReceivedMean
}
fn default_layers() -> Layers {
    Layers::Named("all".into())
}
fn default_iqr() -> f64 {
    1.0
}
fn default_kn_threshold() -> f64 {
    0.05
}
fn default_distance() -> Distance {
    Distance::Cosine
}
fn one_f64() -> f64 {
    1.0
}
fn default_classes() -> usize {
    3
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            /// The defaults are the serde defaults, so TOML and code agree.
            fn default() -> Self {
                toml::from_str("").expect("all fields have defaults")
            }
        }
    )*};
}
default_from_serde!(
    TrainSection,
    LoraSection,
    RiSection,
    KnSection,
    TrSection,
    XtfSection,
    MaskSection
);

/// The four benchmarks of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Gsm8k,
    Math500,
    PubMedQa,
    HumanEval,
}

impl TaskKind {
    /// The name used in configs and reports (`gsm8k`, `math500`, `pubmedqa`, `humaneval`).
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Gsm8k => "gsm8k",
            TaskKind::Math500 => "math500",
            TaskKind::PubMedQa => "pubmedqa",
            TaskKind::HumanEval => "humaneval",
        }
    }
}
