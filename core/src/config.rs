//! Typed job configuration (`JOB.toml`), the one place every option is documented.
//!
//! Unknown fields are errors, and every error names the field by its dotted path
//! (`grpo.clip_high`). Defaults give a working job; see `examples/*.toml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kinds::{DeviceSpec, Dtype, Label, StoreUrl, WeightTransport};
use crate::limits as L;
use crate::sampling::SamplingParams;

/// A whole training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Job name; every rollout and weight request carries it and a learner
    /// refuses another job's.
    #[serde(default = "default_name")]
    pub name: String,
    /// The policy to train.
    pub model: ModelSection,
    /// Where prompts and rewards come from.
    pub task: TaskConfig,
    /// How a problem becomes the prompt text: chat template or raw.
    #[serde(default)]
    pub prompt: PromptConfig,
    /// How rollouts are sampled.
    #[serde(default)]
    pub sampling: SamplingParams,
    /// The update rule: `grpo` (autoregressive policies) or `bgpo` (masked
    /// diffusion policies, memory-constant in the number of ELBO samples).
    #[serde(default)]
    pub algorithm: Algorithm,
    /// The GRPO objective (group size, advantages and clipping; BGPO uses the
    /// group size and advantage options).
    #[serde(default)]
    pub grpo: GrpoConfig,
    /// BGPO's ELBO estimator.
    #[serde(default)]
    pub bgpo: BgpoConfig,
    /// DisCO's score, DRO temperature and trust region.
    #[serde(default)]
    pub disco: DiscoConfig,
    /// Optimisation, supervised warm-up, evaluation and checkpoints.
    #[serde(default)]
    pub train: TrainConfig,
    /// The distributed data plane: staleness, buffers, weight sync.
    #[serde(default)]
    pub rollout: RolloutConfig,
    /// Reward server: verifier and intrinsic (ONI) rewards.
    #[serde(default)]
    pub reward: RewardConfig,
    /// Rollouts per prompt: uniform, or knapsack allocation.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// Hints for prompts every recent rollout failed (NuRL).
    #[serde(default)]
    pub hints: HintConfig,
    /// Processes `sluice dev` starts for the job (and what a cluster should run).
    #[serde(default)]
    pub resources: ResourcesConfig,
    /// Private: a `JobConfig` exists only through [`JobConfig::from_toml`] /
    /// [`JobConfig::load`], which validate it.
    #[serde(skip)]
    checked: Checked,
}

/// Marks a job that passed [`JobConfig::validate`]; it cannot be made elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Checked;

/// Which update rule trains the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// GRPO-family objectives (DAPO / Dr. GRPO options) on an autoregressive policy.
    #[default]
    Grpo,
    /// BGPO (arXiv 2510.11683) on a masked diffusion policy.
    Bgpo,
    /// DisCO (discriminative constrained optimisation) on an autoregressive policy.
    Disco,
}

/// How DisCO scores a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoScore {
    /// Mean token log-likelihood under the current policy (log-L).
    #[default]
    LogL,
    /// Sequence likelihood ratio to the behaviour policy (L-ratio).
    LRatio,
}

/// Hints for prompts that every recent rollout failed (NuRL; DESIGN.md,
/// "Objectives, phase 2"): their next group sees the prompt with a hint built
/// from the reference answer by `template`. Hinted outcomes are kept apart
/// from the prompt's own pass rate (so knapsack budgets and the hint rule keep
/// seeing the prompt as unsolved until it is solved without a hint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HintConfig {
    pub enabled: bool,
    /// The hint, appended to the prompt on a line of its own. Placeholders:
    /// `{answer}` (the reference answer), `{answer_len}` (its length in
    /// characters), `{answer_first}` (its first character).
    pub template: String,
    /// Outcomes a prompt needs (all failures) before it gets a hint.
    pub min_outcomes: usize,
}

impl Default for HintConfig {
    fn default() -> Self {
        HintConfig {
            enabled: false,
            template: "Hint: the answer has {answer_len} characters and begins with {answer_first}.".into(),
            min_outcomes: 8,
        }
    }
}

/// DisCO settings (DESIGN.md, "Objectives, phase 2").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoConfig {
    pub score: DiscoScore,
    /// DRO temperature tau: negatives enter as tau * log mean exp(s / tau); 0
    /// uses their plain mean (the basic objective).
    pub tau: f64,
    /// Squared-hinge penalty weight beta on KL(pi_old || pi_theta) above `delta`.
    pub beta: f64,
    /// The trust region: the KL the update may reach without penalty.
    pub delta: f64,
}

impl Default for DiscoConfig {
    fn default() -> Self {
        DiscoConfig { score: DiscoScore::LogL, tau: 10.0, beta: 1e3, delta: 1e-4 }
    }
}

/// BGPO settings (DESIGN.md, "BGPO").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BgpoConfig {
    /// Monte Carlo samples n of the ELBO per rollout (the paper uses 16); peak
    /// memory of an update does not grow with it.
    pub mc_samples: usize,
}

impl Default for BgpoConfig {
    fn default() -> Self {
        BgpoConfig { mc_samples: 16 }
    }
}

/// How many processes of each role run the job. `sluice dev` starts exactly
/// these; on a cluster they are the chart's replica counts. The device of the
/// policy is `model.device`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesConfig {
    /// Actor processes (each samples `rollout.prompts_per_batch` prompts per batch).
    pub actors: usize,
    /// Data-parallel learner ranks; `train.prompts_per_step` must divide among them.
    pub learners: usize,
    /// Start a reward server and score through it (`sluice dev`); without one each
    /// actor runs the task verifier itself. Needed for intrinsic rewards.
    pub reward_server: bool,
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        ResourcesConfig { actors: 1, learners: 1, reward_server: true }
    }
}

/// How many rollouts each prompt gets (see `budget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetStrategy {
    /// Every prompt gets `grpo.group_size`.
    Uniform,
    /// Knapsack RL: the same total, moved toward prompts whose groups are
    /// likely to have a non-zero gradient.
    Knapsack,
}

/// Rollout budget allocation (DESIGN.md, "Knapsack budget allocation").
/// The default N is `grpo.group_size`; the total per batch is always prompts × N.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    pub strategy: BudgetStrategy,
    /// N_low: rollouts of solved (p = 1) and unsolved (p = 0) prompts, and the least any other prompt gets.
    pub n_low: usize,
    /// N_up: most rollouts the optimiser gives one prompt.
    pub n_up: usize,
    /// Confidence of the cost estimate ln(1 - alpha) / ln(max(p, 1 - p)).
    pub alpha: f64,
    /// Outcomes per prompt kept for its success rate p (across epochs).
    pub history: usize,
    /// Prompts with fewer outcomes get the default N.
    pub min_outcomes: usize,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig { strategy: BudgetStrategy::Uniform, n_low: 2, n_up: 128, alpha: 0.9, history: 16, min_outcomes: 8 }
    }
}

/// The intrinsic reward model (DESIGN.md, "ONI intrinsic reward").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntrinsicModel {
    /// No intrinsic reward.
    None,
    /// Label lookup: 1 for captions labelled helpful, 0 otherwise (and until labelled).
    Retrieval,
    /// A classifier trained on the labels in the background predicts for
    /// captions without a label: 1 when P(helpful) > `threshold`.
    Classification,
    /// A Bradley-Terry scorer trained on the annotator's pairwise preferences;
    /// the reward is its score, normalised by a running mean and std.
    Ranking,
}

/// Which response segments become captions when an episode has no environment messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseCaptions {
    None,
    /// Each non-empty line of the response.
    Lines,
}

/// One rubric rule: captions matching `pattern` (a regex) get `label`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RubricRule {
    pub pattern: String,
    /// `helpful` or `unhelpful`.
    pub label: Label,
}

/// Reward shaping and the ONI annotation pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Weight of the verifier reward.
    pub ext_coef: f64,
    /// Weight of the intrinsic reward (0 turns it off).
    pub int_coef: f64,
    /// A caption's k-th occurrence in an episode adds label / k^beta.
    pub beta: f64,
    pub model: IntrinsicModel,
    /// Captions from responses when the task emits none.
    pub response_captions: ResponseCaptions,
    /// Classification: a caption is helpful when P(helpful) exceeds this.
    pub threshold: f64,
    /// Classification / ranking: labels (preference pairs) needed before the first training run.
    pub train_min_labels: usize,
    /// Label store: `memory` (this process only) or a `redis://host:port[/db]` URL.
    pub store: StoreUrl,
    /// Unlabelled captions waiting for the annotator (newest first; the oldest are dropped).
    pub queue_capacity: usize,
    /// Captions per annotator batch.
    pub batch_size: usize,
    /// Rules of the rubric annotator (used when no LLM endpoint is configured):
    /// first match wins, no match is unhelpful.
    pub rubric: Vec<RubricRule>,
    /// An OpenAI-compatible chat-completions endpoint that labels captions; when
    /// absent the rubric annotator labels them.
    pub llm: Option<LlmConfig>,
    /// Fixed weights of named reward components ([`REWARD_COMPONENTS`]); when
    /// this and `constraints` are empty the loss uses
    /// `ext_coef * extrinsic + int_coef * intrinsic` as sent.
    pub weights: BTreeMap<String, f64>,
    /// Constraints `E[component] >= threshold`, each enforced by a Lagrange
    /// multiplier added to its component's weight.
    pub constraints: BTreeMap<String, f64>,
    /// Step size of the multipliers' dual ascent.
    pub multiplier_lr: f64,
    /// Dynamic weights (gradient-based, arXiv 2509.11452): the `weights` start
    /// the run (normalised to sum 1) and move each step toward the components
    /// whose policy gradients have the most influence. Off by default.
    pub dynamic: bool,
    /// The update's regularisation: the mirror step is `lr / dynamic_scale` times the influence.
    pub dynamic_scale: f64,
}

/// Reward components a learner can weigh or constrain: `correct` (the
/// verifier's reward), `intrinsic` (ONI), `finished` (ended on a stop token),
/// `short` (1 - length / max_new_tokens).
pub const REWARD_COMPONENTS: &[&str] = &["correct", "intrinsic", "finished", "short"];

/// The LLM annotator's endpoint and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// Base URL; requests go to `<base_url>/chat/completions` (e.g. `https://api.openai.com/v1`).
    pub base_url: String,
    pub model: String,
    /// Environment variable holding the API key (sent as a bearer token when set).
    #[serde(default = "default_api_key_env")]
    pub api_key_env: String,
    /// Seconds before one request is abandoned.
    #[serde(default = "default_llm_timeout")]
    pub timeout_s: f64,
    /// Retries of a failed request (5xx, timeout, connection error), with doubling backoff.
    #[serde(default = "default_llm_retries")]
    pub retries: u32,
    /// Requests in flight at once.
    #[serde(default = "default_llm_concurrency")]
    pub concurrency: usize,
    /// Judge prompt file; when absent, the built-in prompt for the job's model
    /// (`prompts/classify.txt`, or `prompts/rank.txt` for `ranking`).
    #[serde(default)]
    pub prompt_file: Option<PathBuf>,
}

fn default_api_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_llm_timeout() -> f64 {
    30.0
}
fn default_llm_retries() -> u32 {
    3
}
fn default_llm_concurrency() -> usize {
    4
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            ext_coef: 1.0,
            int_coef: 0.0,
            beta: 3.0,
            model: IntrinsicModel::None,
            response_captions: ResponseCaptions::None,
            threshold: 0.5,
            train_min_labels: 16,
            store: StoreUrl::Memory,
            queue_capacity: 10_000,
            batch_size: 32,
            rubric: Vec::new(),
            llm: None,
            weights: BTreeMap::new(),
            constraints: BTreeMap::new(),
            multiplier_lr: 0.05,
            dynamic: false,
            dynamic_scale: 1.0,
        }
    }
}

fn default_name() -> String {
    "default".into()
}

/// How rollouts flow from actors to learners and weights flow back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// A learner never trains on a rollout more than this many policy versions
    /// old; 0 is synchronous on-policy training (at most 1024; see
    /// `sluice_core::staleness`, which owns the rule).
    pub max_staleness: u64,
    /// Complete groups a learner buffers before it stops reading from actors.
    pub buffer_groups: usize,
    /// Dtype of weights on the wire: `f32` (bit-exact) or `bf16` (half the bytes).
    pub weights_dtype: Dtype,
    /// Bytes per weight chunk message.
    pub weight_chunk_bytes: usize,
    /// Send an actor that holds a recent version only the weight elements
    /// that changed since (bit patterns compared; a full copy when the delta
    /// would not be under half its size). The actor keeps a host copy of its
    /// weights blob.
    pub delta_weights: bool,
    /// `grpc`: each actor downloads the versions it needs from its learner;
    /// `broadcast`: the learner's rank 0 pushes every version to the actors
    /// that joined its weights broadcast group, over the TCP collective on CPU
    /// or NCCL on CUDA (`sluice_collective::weights`), and an actor downloads
    /// over gRPC only a version the broadcast did not bring it (when it just
    /// joined or the group re-formed). Each actor keeps one more copy of the
    /// weights (the staging buffers the broadcast writes into).
    pub weight_transport: WeightTransport,
    /// Interruptible generation: an actor that hears of a newer policy version
    /// while sampling fetches it and goes on with the new weights at the next
    /// token (its KV cache kept); each rollout records the versions its tokens
    /// came from, and the staleness rule reads the oldest.
    pub interruptible: bool,
    /// Largest encoded rollout message a learner accepts.
    pub max_rollout_bytes: usize,
    /// Largest group a learner accepts.
    pub max_group_size: usize,
    /// Prompts an actor samples per generation batch; 0 means
    /// `train.prompts_per_step` divided among the job's actors.
    pub prompts_per_batch: usize,
}

impl RolloutConfig {
    /// The job's staleness rule.
    pub fn staleness(&self) -> crate::staleness::Staleness {
        crate::staleness::Staleness::new(self.max_staleness)
    }
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            max_staleness: 1,
            buffer_groups: 64,
            weights_dtype: Dtype::F32,
            weight_chunk_bytes: 1 << 20,
            delta_weights: true,
            weight_transport: WeightTransport::Grpc,
            interruptible: false,
            max_rollout_bytes: 1 << 20,
            max_group_size: 1024,
            prompts_per_batch: 0,
        }
    }
}


/// The random-init presets (`sluice_model::model::ModelConfig::preset` builds them).
pub const PRESETS: &[&str] = &["tiny", "small", "qwen2-0.5b", "tiny-diffusion", "small-diffusion"];

/// Which policy to start from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Random-init preset (`tiny`, `small`, `qwen2-0.5b`) with the character-level tokenizer.
    #[serde(default)]
    pub preset: Option<String>,
    /// A local Hugging Face directory (`config.json`, `model.safetensors`, `tokenizer.json`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Parameter dtype: `f32` or `bf16`.
    #[serde(default = "default_dtype")]
    pub dtype: Dtype,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available).
    #[serde(default = "default_device")]
    pub device: DeviceSpec,
    /// Seed of the random init (presets only).
    #[serde(default)]
    pub init_seed: i64,
}

fn default_dtype() -> Dtype {
    Dtype::F32
}
fn default_device() -> DeviceSpec {
    DeviceSpec::Auto
}

/// How problems become prompts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    /// Render prompts with the tokenizer's chat template (as one user turn, or
    /// the task's own messages) with the assistant's turn opened. Unset: chat
    /// exactly when the tokenizer has a template (real instruct checkpoints do,
    /// the character-level presets do not); `true` without a template is an error.
    #[serde(default)]
    pub chat: Option<bool>,
    /// A system turn put before every prompt (chat prompts only).
    #[serde(default)]
    pub system: Option<String>,
    /// Extra template variables, as `apply_chat_template(**kwargs)` takes them
    /// (Qwen3: `{ enable_thinking = false }`).
    #[serde(default)]
    pub template_vars: serde_json::Map<String, serde_json::Value>,
}

/// Where inside `[task]` a job file fails, by parsing the table as the variant
/// its `kind` names (serde's internally tagged enums report only `task`).
fn task_error(text: &str) -> Option<Error> {
    fn variant<T: serde::de::DeserializeOwned>(table: toml::Table) -> Option<Error> {
        let e = serde_path_to_error::deserialize::<_, T>(toml::Value::Table(table)).err()?;
        let path = e.path().to_string();
        let field = if path == "." { "task".to_string() } else { format!("task.{path}") };
        Some(Error::config(field, e.into_inner().message().to_string()))
    }
    let doc: toml::Table = toml::from_str(text).ok()?;
    let mut table = doc.get("task")?.as_table()?.clone();
    let kind = table.remove("kind")?;
    match kind.as_str() {
        Some("arithmetic") => variant::<ArithmeticConfig>(table),
        Some("countdown") => variant::<CountdownConfig>(table),
        Some("dataset" | "jsonl") => variant::<DatasetConfig>(table),
        Some("adventure") => variant::<AdventureConfig>(table),
        _ => Some(Error::config("task.kind", format!("{kind} is not one of arithmetic, countdown, dataset, adventure"))),
    }
}

/// The task, selected by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskConfig {
    Arithmetic(ArithmeticConfig),
    Countdown(CountdownConfig),
    /// Rows of JSONL / Parquet files (`kind = "jsonl"` is the old name).
    #[serde(alias = "jsonl")]
    Dataset(DatasetConfig),
    Adventure(AdventureConfig),
}

/// The multi-turn text adventure (the ONI testbed; see `tasks::Adventure`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdventureConfig {
    /// Rooms in a world (2..=12); the last holds the treasure behind a locked door.
    #[serde(default = "four")]
    pub rooms: usize,
    /// Actions per episode (1..=64).
    #[serde(default = "eight")]
    pub max_turns: usize,
    /// Distinct worlds (problem i is world i mod layouts); 0: a new world per problem.
    #[serde(default)]
    pub layouts: u64,
    #[serde(default)]
    pub seed: u64,
}

/// `a op b op ... =` with integer operands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArithmeticConfig {
    /// Maximum digits per operand (1..=6).
    #[serde(default = "one")]
    pub digits: u32,
    /// Number of operands (2..=4).
    #[serde(default = "two")]
    pub operands: u32,
    /// Operators to draw from: any of `+ - *`.
    #[serde(default = "plus")]
    pub operators: Vec<char>,
    /// Seed of the problem stream.
    #[serde(default)]
    pub seed: u64,
    /// Training problems before the stream repeats (epochs; problem `i` is
    /// `i mod train_size`); 0: an endless stream of new problems.
    #[serde(default)]
    pub train_size: u64,
}

/// Reach a target with the given numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountdownConfig {
    /// How many numbers (2..=6).
    #[serde(default = "three")]
    pub numbers: usize,
    /// Numbers are drawn from 1..=max_number.
    #[serde(default = "twenty")]
    pub max_number: i64,
    #[serde(default)]
    pub seed: u64,
}

/// Problems from dataset files (see `sluice_core::tasks::DatasetTask`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// A `.jsonl` or `.parquet` file, or a directory of them (Hugging Face
    /// layout: `train-*` files train, `test-*`/`validation-*` ones evaluate).
    pub path: PathBuf,
    /// Held-out rows; else the directory's `test` files, else the training rows.
    #[serde(default)]
    pub eval_path: Option<PathBuf>,
    /// The column with the prompt: text, or a list of `{role, content}` messages.
    #[serde(default = "prompt_field")]
    pub prompt_field: String,
    /// The column with the reference answer (or a solution to extract it from).
    #[serde(default = "answer_field")]
    pub answer_field: String,
    /// How to find the final answer in the answer column.
    #[serde(default)]
    pub answer_format: AnswerFormat,
    /// Verifier of rows without a `verifier` column.
    #[serde(default = "exact")]
    pub verifier: crate::tasks::Verifier,
    /// Shuffle the rows with this seed (the same order on every process); unset: file order.
    #[serde(default)]
    pub shuffle_seed: Option<u64>,
}

impl DatasetConfig {
    /// The columns every row must have.
    pub fn columns(&self) -> [&str; 2] {
        [&self.prompt_field, &self.answer_field]
    }
}

fn prompt_field() -> String {
    "prompt".into()
}
fn answer_field() -> String {
    "answer".into()
}
fn exact() -> crate::tasks::Verifier {
    crate::tasks::Verifier::Exact
}

/// Where the final answer sits in a reference solution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerFormat {
    /// The whole column, trimmed.
    #[default]
    Plain,
    /// After the last `####` (GSM8K), thousands separators dropped.
    Gsm8k,
    /// Inside the last `\boxed{..}` (MATH).
    Boxed,
}

fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn eight() -> usize {
    8
}
fn twenty() -> i64 {
    20
}
fn plus() -> Vec<char> {
    vec!['+']
}

/// How per-token losses are reduced to one number (DESIGN.md, "Aggregation modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAgg {
    /// Mean over all response tokens of the batch (DAPO).
    TokenMean,
    /// Mean over sequences of the per-sequence token mean (original GRPO).
    SeqMeanTokenMean,
    /// Mean over sequences of the token sum divided by a constant budget (Dr. GRPO).
    SeqMeanTokenSumNorm,
}

/// The GRPO objective (DeepSeekMath eq. 3 with DAPO and Dr. GRPO options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Completions per prompt (G).
    pub group_size: usize,
    /// Lower clip range: rho is clipped at 1 - clip_low.
    pub clip_low: f64,
    /// Upper clip range: rho is clipped at 1 + clip_high (DAPO clip-higher uses 0.28).
    pub clip_high: f64,
    /// Dual-clip constant c for negative advantages (pg <= -A*c); 0 turns it off.
    pub dual_clip: f64,
    /// beta: weight of the k3 KL penalty to the frozen reference policy; 0 skips the reference model.
    pub kl_coef: f64,
    /// Aggregation of per-token losses.
    pub loss_agg: LossAgg,
    /// Divide advantages by the group std (false for Dr. GRPO).
    pub norm_adv_by_std: bool,
    /// Constant generation budget for `seq-mean-token-sum-norm`; 0 means `sampling.max_new_tokens`.
    pub generation_budget: usize,
    /// DAPO overlong shaping buffer L_c in tokens, with L = `sampling.max_new_tokens`; 0 turns it off.
    pub overlong_buffer: usize,
    /// DAPO dynamic sampling: drop groups whose rewards are all equal and refill with new prompts.
    pub filter_zero_variance: bool,
    /// Refill rounds per step when filtering; the step trains on what it has after that.
    pub max_refill_rounds: usize,
    /// Passes over each batch of rollouts (PPO epochs).
    pub epochs: usize,
    /// Optimizer steps per epoch (the batch is split into this many mini-batches).
    pub mini_batches: usize,
    /// Advantages are clamped to [-c, c] after normalisation; 0 turns it off.
    /// Unset: 5 with knapsack budgets (one success in a group of N has
    /// advantage (N-1)/sqrt(N), above 5 from N = 27), off otherwise.
    pub advantage_clip: Option<f64>,
    /// Decoupled PPO (AReaL): the learner recomputes proximal log-probs with
    /// the weights at the start of the step, takes the clip around them, and
    /// weighs each token by pi_prox / pi_behaviour (capped by `tis_cap`).
    pub decoupled: bool,
    /// Cap C on the behaviour importance weight pi_prox / pi_behaviour.
    pub tis_cap: f64,
    /// What happens above the cap: `truncate` (w = C) or `mask` (the token is not trained).
    pub tis_mode: TisMode,
}

/// Truncated importance sampling in decoupled PPO: what a token whose
/// behaviour weight exceeds `tis_cap` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TisMode {
    /// w = min(w, C).
    #[default]
    Truncate,
    /// w = 0 above C (the token does not train).
    Mask,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            group_size: 8,
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: 3.0,
            kl_coef: 0.0,
            loss_agg: LossAgg::TokenMean,
            norm_adv_by_std: true,
            generation_budget: 0,
            overlong_buffer: 0,
            filter_zero_variance: false,
            max_refill_rounds: 2,
            epochs: 1,
            mini_batches: 1,
            advantage_clip: None,
            decoupled: false,
            tis_cap: 5.0,
            tis_mode: TisMode::Truncate,
        }
    }
}

/// Optimisation and bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// GRPO steps to run (after the supervised warm-up).
    pub steps: u64,
    /// Prompts drawn per GRPO step; each gets `grpo.group_size` completions.
    pub prompts_per_step: usize,
    /// AdamW learning rate (the peak, when a schedule is set).
    pub lr: f64,
    /// GRPO steps over which the learning rate rises linearly from lr/warmup_steps to lr.
    pub warmup_steps: u64,
    /// After warm-up: `constant`, or `linear` / `cosine` decay to `lr * min_lr_ratio` at the last step.
    pub lr_schedule: LrSchedule,
    /// Where the decay ends, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Sequences per forward/backward pass (gradient accumulation inside a mini-batch).
    pub micro_batch_size: usize,
    /// Keep only each decoder layer's input in the forward pass and recompute
    /// the layer in the backward pass: activation memory of one layer instead
    /// of all of them, for one more forward pass.
    pub activation_checkpointing: bool,
    /// Seed of sampling and data order.
    pub seed: u64,
    /// Supervised warm-up steps on task demonstrations before GRPO (0 = none).
    pub sft_steps: u64,
    /// Demonstrations per supervised step.
    pub sft_batch_size: usize,
    /// Learning rate of the supervised warm-up.
    pub sft_lr: f64,
    /// Evaluate (greedy, held-out split) every this many GRPO steps; 0 = only at start and end.
    pub eval_every: u64,
    /// Held-out prompts per evaluation.
    pub eval_prompts: usize,
    /// Write a checkpoint every this many GRPO steps; 0 = only at the end.
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (oldest removed first); at least 1.
    pub keep_checkpoints: usize,
    /// Run directory: checkpoints and metrics.jsonl.
    pub out_dir: PathBuf,
}

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Constant,
    Linear,
    Cosine,
}

impl TrainConfig {
    /// The learning rate of GRPO step `step` (0-based): a pure function of the
    /// step, so a resumed run continues the schedule where it stopped.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1);
        let p = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let keep = match self.lr_schedule {
            LrSchedule::Constant => return self.lr,
            LrSchedule::Linear => 1.0 - p,
            LrSchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        };
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * keep)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 50,
            prompts_per_step: 8,
            lr: 1e-4,
            warmup_steps: 0,
            lr_schedule: LrSchedule::Constant,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            micro_batch_size: 64,
            activation_checkpointing: false,
            seed: 0,
            sft_steps: 0,
            sft_batch_size: 32,
            sft_lr: 1e-3,
            eval_every: 0,
            eval_prompts: 64,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            out_dir: PathBuf::from("runs/default"),
        }
    }
}

/// Applies `section.key=value` overrides to job-file TOML text and returns the
/// new text. The value is read as a TOML value (`1e-5`, `true`, `"text"`,
/// `[1, 2]`), or taken as a string when it is not one (`model.dtype=bf16`).
/// Missing sections are created; whether the key exists is for the job's
/// parser to say (it names unknown fields).
pub fn apply_overrides(text: &str, overrides: &[String]) -> Result<String> {
    let mut root: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::config("(root)", e.message().to_string()))?;
    for o in overrides {
        let bad = |why: &str| Error::config(format!("--set {o}"), why.to_string());
        let (key, raw) = o.split_once('=').ok_or_else(|| bad("expected section.key=value"))?;
        let parts: Vec<&str> = key.trim().split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("the key is empty or has an empty part"));
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        let mut table = &mut root;
        for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
            let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| bad(&format!("`{}` is a value, not a section", parts[..=i].join("."))))?;
        }
        table.insert(parts[parts.len() - 1].to_string(), value);
    }
    toml::to_string(&root).map_err(|e| Error::config("(root)", e.to_string()))
}

/// "must be between lo and hi", for the bounds in [`crate::limits`].
fn between(lo: usize, hi: usize) -> String {
    format!("must be between {lo} and {hi}")
}

impl JobConfig {
    /// Parses TOML text; errors name the offending field.
    pub fn from_toml(text: &str) -> Result<Self> {
        if text.len() > L::MAX_JOB_FILE_BYTES {
            return Err(Error::config("(file)", format!("{} bytes, over the limit of {}", text.len(), L::MAX_JOB_FILE_BYTES)));
        }
        let de = toml::Deserializer::new(text);
        let cfg: JobConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "task" {
                // The tagged enum hides where inside `[task]` it failed; ask the variant.
                if let Some(precise) = task_error(text) {
                    return precise;
                }
            }
            Error::config(if path == "." { "(root)".to_string() } else { path }, inner.message().to_string())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(Self::load(path, &[])?.1)
    }

    /// Reads a job file and applies command-line overrides (`--set
    /// section.key=value`, in order; see [`apply_overrides`]). Returns the
    /// resulting TOML (what a submitted job carries) and the parsed job. Errors
    /// name the file and the field; an error an override caused names it too.
    pub fn load(path: &Path, overrides: &[String]) -> Result<(String, Self)> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let name_file = |e: Error| match e {
            Error::Config { path: field, reason } => Error::Config { path: format!("{}: {field}", path.display()), reason },
            other => other,
        };
        if overrides.is_empty() {
            return Ok((text.clone(), Self::from_toml(&text).map_err(name_file)?));
        }
        let changed = apply_overrides(&text, overrides).map_err(name_file)?;
        match Self::from_toml(&changed) {
            Ok(cfg) => Ok((changed, cfg)),
            // The file alone is fine: the override is to blame.
            Err(Error::Config { path: field, reason }) if Self::from_toml(&text).is_ok() => {
                Err(Error::Config { path: format!("--set {}: {field}", overrides.join(" --set ")), reason })
            }
            Err(e) => Err(name_file(e)),
        }
    }

    /// Cross-field checks; each error names its field.
    fn validate(&self) -> Result<()> {
        let m = &self.model;
        match (&m.preset, &m.path) {
            (None, None) => return Err(Error::config("model", "set `preset` or `path`")),
            (Some(_), Some(_)) => return Err(Error::config("model", "set only one of `preset` and `path`")),
            _ => {}
        }
        if let TaskConfig::Arithmetic(a) = &self.task {
            a.validate("task")?;
        }
        self.sampling.validate("sampling")?;
        let g = &self.grpo;
        let check = |ok: bool, field: &str, why: &str| if ok { Ok(()) } else { Err(Error::config(field, why)) };
        check(g.group_size >= 1, "grpo.group_size", "must be >= 1")?;
        self.validate_algorithm()?;
        let r = &self.resources;
        check(r.actors >= 1, "resources.actors", "must be >= 1")?;
        check(r.learners >= 1, "resources.learners", "must be >= 1")?;
        check(
            self.train.prompts_per_step.is_multiple_of(r.learners),
            "resources.learners",
            "must divide train.prompts_per_step",
        )?;
        check(
            r.reward_server || self.reward.model == IntrinsicModel::None,
            "resources.reward_server",
            "must be true when reward.model sets an intrinsic reward",
        )?;
        check(
            (0.0..=1.0).contains(&self.train.min_lr_ratio),
            "train.min_lr_ratio",
            "must be in [0, 1]",
        )?;
        check(g.clip_low >= 0.0 && g.clip_low < 1.0, "grpo.clip_low", "must be in [0, 1)")?;
        check(g.clip_high >= 0.0, "grpo.clip_high", "must be >= 0")?;
        check(g.dual_clip == 0.0 || g.dual_clip > 1.0, "grpo.dual_clip", "must be 0 (off) or > 1")?;
        check(g.kl_coef >= 0.0, "grpo.kl_coef", "must be >= 0")?;
        check(g.epochs >= 1, "grpo.epochs", "must be >= 1")?;
        if let Some(c) = g.advantage_clip {
            check(c.is_finite() && c >= 0.0, "grpo.advantage_clip", "must be a finite number >= 0 (0 turns it off)")?;
        }
        check(g.tis_cap.is_finite() && g.tis_cap >= 1.0, "grpo.tis_cap", "must be a finite number >= 1")?;
        check(g.mini_batches >= 1, "grpo.mini_batches", "must be >= 1")?;
        check(
            (g.overlong_buffer as i64) < self.sampling.max_new_tokens,
            "grpo.overlong_buffer",
            "must be smaller than sampling.max_new_tokens",
        )?;
        let t = &self.train;
        // Upper bounds keep one job file from asking a process for terabytes.
        check((1..=L::MAX_PROMPTS_PER_STEP).contains(&t.prompts_per_step), "train.prompts_per_step", &between(1, L::MAX_PROMPTS_PER_STEP))?;
        check(g.group_size <= L::MAX_GROUP_SIZE, "grpo.group_size", &format!("must be at most {}", L::MAX_GROUP_SIZE))?;
        check(t.lr > 0.0 && t.lr.is_finite(), "train.lr", "must be > 0")?;
        check(t.sft_lr > 0.0 && t.sft_lr.is_finite(), "train.sft_lr", "must be > 0")?;
        check((0.0..1.0).contains(&t.beta1), "train.beta1", "must be in [0, 1)")?;
        check((0.0..1.0).contains(&t.beta2), "train.beta2", "must be in [0, 1)")?;
        check(t.adam_eps > 0.0 && t.adam_eps.is_finite(), "train.adam_eps", "must be a finite number > 0")?;
        check(t.weight_decay >= 0.0 && t.weight_decay.is_finite(), "train.weight_decay", "must be a finite number >= 0")?;
        check(t.max_grad_norm.is_finite(), "train.max_grad_norm", "must be a finite number")?;
        check(t.max_grad_norm >= 0.0, "train.max_grad_norm", "must be >= 0")?;
        check((1..=L::MAX_BATCH_SIZE).contains(&t.micro_batch_size), "train.micro_batch_size", &between(1, L::MAX_BATCH_SIZE))?;
        check((1..=L::MAX_BATCH_SIZE).contains(&t.sft_batch_size), "train.sft_batch_size", &between(1, L::MAX_BATCH_SIZE))?;
        check((1..=L::MAX_EVAL_PROMPTS).contains(&t.eval_prompts), "train.eval_prompts", &between(1, L::MAX_EVAL_PROMPTS))?;
        check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")?;
        check(
            t.prompts_per_step.saturating_mul(g.group_size) >= g.mini_batches,
            "grpo.mini_batches",
            "more mini-batches than rollouts per step",
        )?;
        let r = &self.rollout;
        let name_chars = self.name.chars().count();
        check((1..=L::MAX_JOB_NAME_CHARS).contains(&name_chars), "name", &format!("must be 1 to {} characters", L::MAX_JOB_NAME_CHARS))?;
        check(!self.name.chars().any(char::is_control), "name", "must not contain control characters")?;
        if let Some(p) = &m.preset {
            check(PRESETS.contains(&p.as_str()), "model.preset", &format!("unknown preset; known: {}", PRESETS.join(", ")))?;
        }
        check((1..=L::MAX_BUFFER_GROUPS).contains(&r.buffer_groups), "rollout.buffer_groups", &between(1, L::MAX_BUFFER_GROUPS))?;
        check(r.max_staleness <= L::MAX_STALENESS, "rollout.max_staleness", &format!("must be at most {}", L::MAX_STALENESS))?;
        check(r.weight_chunk_bytes >= 1024, "rollout.weight_chunk_bytes", "must be >= 1024")?;
        let chunk = format!("must be <= {} (32 MiB)", L::MAX_CHUNK_BYTES);
        check(r.weight_chunk_bytes <= L::MAX_CHUNK_BYTES, "rollout.weight_chunk_bytes", &chunk)?;
        check(r.max_rollout_bytes >= 1024, "rollout.max_rollout_bytes", "must be >= 1024")?;
        check(r.max_rollout_bytes <= L::MAX_CHUNK_BYTES, "rollout.max_rollout_bytes", &chunk)?;
        check(r.max_group_size >= g.group_size, "rollout.max_group_size", "must be >= grpo.group_size")?;
        check(r.max_group_size <= L::MAX_GROUP_SIZE, "rollout.max_group_size", &format!("must be at most {}", L::MAX_GROUP_SIZE))?;
        let b = &self.budget;
        check(b.n_low >= 2, "budget.n_low", "must be >= 2 (a group of one has no advantage)")?;
        check(b.n_low <= g.group_size, "budget.n_low", "must be <= grpo.group_size (the default N)")?;
        check(b.n_up >= g.group_size, "budget.n_up", "must be >= grpo.group_size (the default N)")?;
        check(b.n_up <= r.max_group_size, "budget.n_up", "must be <= rollout.max_group_size")?;
        check(b.alpha > 0.0 && b.alpha < 1.0, "budget.alpha", "must be in (0, 1)")?;
        check(b.min_outcomes >= 1, "budget.min_outcomes", "must be >= 1")?;
        check(b.history >= b.min_outcomes, "budget.history", "must be >= budget.min_outcomes")?;
        let w = &self.reward;
        check(w.ext_coef.is_finite(), "reward.ext_coef", "must be a finite number")?;
        check(w.int_coef.is_finite() && w.int_coef >= 0.0, "reward.int_coef", "must be >= 0")?;
        check(w.beta.is_finite() && w.beta >= 0.0, "reward.beta", "must be >= 0")?;
        check(
            w.int_coef == 0.0 || w.model != IntrinsicModel::None,
            "reward.model",
            "int_coef > 0 needs an intrinsic model (retrieval, classification, ranking)",
        )?;
        check((1..=L::MAX_QUEUE_CAPACITY).contains(&w.queue_capacity), "reward.queue_capacity", &between(1, L::MAX_QUEUE_CAPACITY))?;
        check(w.batch_size <= L::MAX_REWARD_BATCH, "reward.batch_size", &format!("must be at most {}", L::MAX_REWARD_BATCH))?;
        check((0.0..1.0).contains(&w.threshold), "reward.threshold", "must be in [0, 1)")?;
        check(w.train_min_labels >= 2, "reward.train_min_labels", "must be >= 2")?;
        check(w.batch_size >= 1, "reward.batch_size", "must be >= 1")?;
        if let Some(l) = &w.llm {
            check(
                l.base_url.starts_with("http://") || l.base_url.starts_with("https://"),
                "reward.llm.base_url",
                "must be an http:// or https:// URL",
            )?;
            check(!l.model.is_empty(), "reward.llm.model", "must not be empty")?;
            check(l.timeout_s > 0.0 && l.timeout_s.is_finite(), "reward.llm.timeout_s", "must be > 0")?;
            check(l.concurrency >= 1, "reward.llm.concurrency", "must be >= 1")?;
        }
        for (table, map) in [("reward.weights", &w.weights), ("reward.constraints", &w.constraints)] {
            for (name, v) in map {
                let field = format!("{table}.{name}");
                check(REWARD_COMPONENTS.contains(&name.as_str()), &field, &format!("unknown reward component; known: {}", REWARD_COMPONENTS.join(", ")))?;
                check(v.is_finite(), &field, "must be a finite number")?;
                check(
                    name != "intrinsic" || w.model != IntrinsicModel::None,
                    &field,
                    "the reward server produces no intrinsic reward for this job (reward.model = \"none\")",
                )?;
            }
        }
        check(w.multiplier_lr.is_finite() && w.multiplier_lr > 0.0, "reward.multiplier_lr", "must be a finite number > 0")?;
        check(w.dynamic_scale.is_finite() && w.dynamic_scale > 0.0, "reward.dynamic_scale", "must be a finite number > 0")?;
        if w.dynamic {
            check(w.weights.len() >= 2, "reward.weights", "dynamic weights need at least two components")?;
            check(w.weights.values().all(|&v| v > 0.0), "reward.weights", "dynamic weights start from positive weights")?;
            check(self.algorithm != Algorithm::Bgpo, "reward.dynamic", "dynamic weights probe policy gradients with behaviour log-probs; BGPO has none")?;
        }
        let h = &self.hints;
        check(!h.template.trim().is_empty() && h.template.len() <= 1024, "hints.template", "must be 1 to 1024 bytes")?;
        check(h.min_outcomes >= 1, "hints.min_outcomes", "must be >= 1")?;
        for (i, rule) in w.rubric.iter().enumerate() {
            if let Err(e) = regex::Regex::new(&rule.pattern) {
                return Err(Error::config(format!("reward.rubric[{i}].pattern"), format!("invalid regex: {e}")));
            }
        }
        Ok(())
    }

    /// The algorithm fits the policy and the task (presets are checked here;
    /// a policy from a directory is checked when it is loaded).
    fn validate_algorithm(&self) -> Result<()> {
        let diffusion_preset = self.model.preset.as_deref().map(|p| p.ends_with("-diffusion"));
        match self.algorithm {
            Algorithm::Grpo => {
                if diffusion_preset == Some(true) {
                    return Err(Error::config(
                        "algorithm",
                        "`grpo` needs an autoregressive policy; a diffusion policy trains with algorithm = \"bgpo\"",
                    ));
                }
            }
            Algorithm::Disco => {
                if diffusion_preset == Some(true) {
                    return Err(Error::config("algorithm", "`disco` needs an autoregressive policy; a diffusion policy trains with algorithm = \"bgpo\""));
                }
                let d = &self.disco;
                let check = |ok: bool, field: &str, why: &str| if ok { Ok(()) } else { Err(Error::config(field, why)) };
                check(d.tau.is_finite() && d.tau >= 0.0, "disco.tau", "must be a finite number >= 0 (0: the basic objective)")?;
                check(d.beta.is_finite() && d.beta >= 0.0, "disco.beta", "must be a finite number >= 0")?;
                check(d.delta.is_finite() && d.delta >= 0.0, "disco.delta", "must be a finite number >= 0")?;
                check(self.grpo.epochs == 1, "grpo.epochs", "DisCO takes one pass over each batch: must be 1")?;
                check(!self.grpo.decoupled, "grpo.decoupled", "decoupled PPO is a GRPO option")?;
            }
            Algorithm::Bgpo => {
                if diffusion_preset == Some(false) {
                    return Err(Error::config(
                        "algorithm",
                        "`bgpo` needs a masked diffusion policy (e.g. model.preset = \"tiny-diffusion\"), not an autoregressive one",
                    ));
                }
                if matches!(self.task, TaskConfig::Adventure(_)) {
                    return Err(Error::config("algorithm", "`bgpo` does not run multi-turn environments (task.kind = \"adventure\")"));
                }
                let check = |ok: bool, field: &str, why: &str| if ok { Ok(()) } else { Err(Error::config(field, why)) };
                check(self.bgpo.mc_samples >= 1, "bgpo.mc_samples", "must be >= 1")?;
                check(self.grpo.epochs == 1 && self.grpo.mini_batches == 1, "grpo.epochs", "BGPO takes one update per batch: epochs and mini_batches must be 1")?;
                check(self.grpo.kl_coef == 0.0, "grpo.kl_coef", "BGPO has no KL term: must be 0")?;
                check(!self.grpo.decoupled, "grpo.decoupled", "decoupled PPO is a GRPO option; BGPO bounds its own ratio")?;
            }
        }
        Ok(())
    }

    /// The advantage clip in force: `grpo.advantage_clip`, else 5 with
    /// knapsack budgets (the Knapsack RL reference clips at ±5), else off (0).
    pub fn advantage_clip(&self) -> f64 {
        match self.grpo.advantage_clip {
            Some(c) => c,
            None if self.budget.strategy == BudgetStrategy::Knapsack => 5.0,
            None => 0.0,
        }
    }

    /// The generation budget used by `seq-mean-token-sum-norm`.
    pub fn generation_budget(&self) -> usize {
        if self.grpo.generation_budget > 0 {
            self.grpo.generation_budget
        } else {
            self.sampling.max_new_tokens as usize
        }
    }
}

#[cfg(test)]
mod override_tests {
    use super::*;

    const JOB: &str = "[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\n[train]\nlr = 0.001\n";

    fn load(sets: &[&str]) -> Result<JobConfig> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.toml");
        std::fs::write(&p, JOB).unwrap();
        JobConfig::load(&p, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map(|(_, c)| c)
    }

    #[test]
    fn lr_schedules_warm_up_then_decay_to_the_floor() {
        let mut t = TrainConfig { lr: 1.0, steps: 110, warmup_steps: 10, ..TrainConfig::default() };
        assert_eq!((t.lr_at(0), t.lr_at(4), t.lr_at(9), t.lr_at(50)), (0.1, 0.5, 1.0, 1.0));
        t.lr_schedule = LrSchedule::Cosine;
        t.min_lr_ratio = 0.1;
        assert!((t.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((t.lr_at(60) - 0.55).abs() < 1e-12, "{}", t.lr_at(60));
        assert!((t.lr_at(110) - 0.1).abs() < 1e-12 && (t.lr_at(500) - 0.1).abs() < 1e-12);
        t.lr_schedule = LrSchedule::Linear;
        assert!((t.lr_at(35) - (0.1 + 0.9 * 0.75)).abs() < 1e-12, "{}", t.lr_at(35));
    }

    #[test]
    fn overrides_set_values_of_every_type_and_create_sections() {
        let c = load(&["train.lr=1e-5", "model.dtype=bf16", "rollout.max_staleness=3", "grpo.clip_high=0.3", "name=\"x\""]).unwrap();
        assert_eq!(c.train.lr, 1e-5);
        assert_eq!(c.model.dtype, crate::kinds::Dtype::Bf16);
        assert_eq!(c.rollout.max_staleness, 3);
        assert_eq!(c.grpo.clip_high, 0.3);
        assert_eq!(c.name, "x");
        // Later overrides win.
        assert_eq!(load(&["train.lr=1", "train.lr=2"]).unwrap().train.lr, 2.0);
    }

    #[test]
    fn bad_overrides_name_the_field_and_the_override() {
        let e = load(&["train.nope=1"]).unwrap_err().to_string();
        assert!(e.contains("--set train.nope=1") && e.contains("nope"), "{e}");
        let e = load(&["train.lr=fast"]).unwrap_err().to_string();
        assert!(e.contains("train.lr"), "{e}");
        let e = load(&["train.lr"]).unwrap_err().to_string();
        assert!(e.contains("section.key=value"), "{e}");
        let e = load(&["train.lr.x=1"]).unwrap_err().to_string();
        assert!(e.contains("`train.lr` is a value"), "{e}");
        let e = load(&["..=1"]).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = JobConfig::from_toml(MIN).unwrap();
        assert_eq!(c.grpo, GrpoConfig::default());
        assert_eq!(c.task, TaskConfig::Arithmetic(ArithmeticConfig { digits: 1, operands: 2, operators: vec!['+'], seed: 0, train_size: 0 }));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (format!("{MIN}[grpo]\nclip_hgh = 0.3\n"), "grpo"),
            (format!("{MIN}[grpo]\nclip_low = 1.5\n"), "grpo.clip_low"),
            (format!("{MIN}[grpo]\nloss_agg = \"mean\"\n"), "grpo.loss_agg"),
            (format!("{MIN}[train]\nlr = \"fast\"\n"), "train.lr"),
            (format!("{MIN}[sampling]\ntop_p = 0\n"), "sampling.top_p"),
            (format!("{MIN}[rollout]\nweights_dtype = \"f16\"\n"), "rollout.weights_dtype"),
            (format!("{MIN}[rollout]\nweight_transport = \"nccl\"\n"), "rollout.weight_transport"),
            (format!("{MIN}[rollout]\nmax_staleness = -1\n"), "rollout.max_staleness"),
            (format!("{MIN}[rollout]\nmax_staleness = 9223372036854775807\n"), "rollout.max_staleness"),
            (format!("{MIN}[train]\nprompts_per_step = 1000000000000\n"), "train.prompts_per_step"),
            (format!("{MIN}[grpo]\ngroup_size = 1000000\n"), "grpo.group_size"),
            (format!("{MIN}[train]\neval_prompts = 100000000\n"), "train.eval_prompts"),
            (format!("{MIN}[reward]\nint_coef = 0.5\n"), "reward.model"),
            (format!("{MIN}[reward]\nstore = \"mysql://x\"\n"), "reward.store"),
            (format!("{MIN}[reward]\nmodel = \"oracle\"\n"), "reward.model"),
            (format!("{MIN}[resources]\nlearners = 3\n"), "resources.learners"),
            (format!("algorithm = \"bgpo\"\n{MIN}"), "algorithm"),
            ("algorithm = \"grpo\"\n[model]\npreset = \"tiny-diffusion\"\n[task]\nkind = \"arithmetic\"\n".to_string(), "algorithm"),
            ("algorithm = \"bgpo\"\n[model]\npreset = \"tiny-diffusion\"\n[task]\nkind = \"arithmetic\"\n[grpo]\nepochs = 2\n".to_string(), "grpo.epochs"),
            ("algorithm = \"bgpo\"\n[model]\npreset = \"tiny-diffusion\"\n[task]\nkind = \"arithmetic\"\n[sampling]\nmax_new_tokens = 6\nblock_length = 4\n".to_string(), "sampling.block_length"),
            (format!("{MIN}[resources]\ngpus = 3\n"), "resources"),
            (format!("{MIN}[[reward.rubric]]\npattern = \"(\"\nlabel = \"helpful\"\n"), "reward.rubric[0].pattern"),
            (format!("{MIN}[[reward.rubric]]\npattern = \"x\"\nlabel = \"maybe\"\n"), "reward.rubric[0].label"),
            ("[model]\npreset = \"tiny\"\ndevice = \"tpu\"\n[task]\nkind = \"arithmetic\"\n".to_string(), "model.device"),
            ("[model]\npreset = \"huge\"\n[task]\nkind = \"arithmetic\"\n".to_string(), "model.preset"),
            (format!("{MIN}[train]\nweight_decay = nan\n"), "train.weight_decay"),
            (format!("{MIN}[train]\nadam_eps = inf\n"), "train.adam_eps"),
            (format!("name = \"a\\u0007b\"\n{MIN}"), "name"),
            (format!("{MIN}[rollout]\nbuffer_groups = 9223372036854775807\n"), "rollout.buffer_groups"),
            (format!("{MIN}[reward]\nqueue_capacity = 9223372036854775807\n"), "reward.queue_capacity"),
            (format!("{MIN}# {}\n", "x".repeat(L::MAX_JOB_FILE_BYTES)), "(file)"),
            ("[model]\npreset = \"tiny\"\n[task]\nkind = \"chess\"\n".to_string(), "task"),
            ("[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\ndigit = 3\n".to_string(), "task"),
            ("[model]\ndtype = \"f32\"\n[task]\nkind = \"arithmetic\"\n".to_string(), "model"),
            ("[model]\npreset = \"tiny\"\ndtype = \"f16\"\n[task]\nkind = \"arithmetic\"\n".to_string(), "model.dtype"),
        ];
        for (text, field) in cases {
            match JobConfig::from_toml(&text) {
                Err(Error::Config { path, reason }) => assert!(path.starts_with(field), "{text}: got path `{path}` ({reason})"),
                other => panic!("{text}: expected a config error, got {other:?}"),
            }
        }
        let e = JobConfig::from_toml(&format!("{MIN}[grpo]\nclip_hgh = 0.3\n")).unwrap_err().to_string();
        assert!(e.contains("clip_hgh"), "{e}");
        // Objectives and reward components: unknown names list the valid ones.
        for (text, field, words) in [
            (format!("algorithm = \"ppo\"\n{MIN}"), "algorithm", "disco"),
            (format!("{MIN}[reward]\nweights = {{ bogus = 1.0 }}\n"), "reward.weights.bogus", "correct, intrinsic, finished, short"),
            (format!("{MIN}[reward]\nconstraints = {{ intrinsic = 0.5 }}\n"), "reward.constraints.intrinsic", "no intrinsic reward"),
            (format!("{MIN}[reward]\nweights = {{ correct = nan }}\n"), "reward.weights.correct", "finite"),
            (format!("algorithm = \"disco\"\n{MIN}[disco]\ntau = -1.0\n"), "disco.tau", ">= 0"),
            (format!("{MIN}[grpo]\ntis_cap = 0.5\n"), "grpo.tis_cap", ">= 1"),
            (format!("{MIN}[grpo]\nadvantage_clip = -2.0\n"), "grpo.advantage_clip", ">= 0"),
            (format!("{MIN}[reward]\nweights = {{ correct = 1.0 }}\ndynamic = true\n"), "reward.weights", "at least two"),
            (format!("{MIN}[reward]\ndynamic_scale = 0.0\n"), "reward.dynamic_scale", "> 0"),
        ] {
            match JobConfig::from_toml(&text) {
                Err(Error::Config { path, reason }) => {
                    assert_eq!(path, field, "{text}: {reason}");
                    assert!(reason.contains(words), "{text}: {reason}");
                }
                other => panic!("{text}: expected a config error, got {other:?}"),
            }
        }
        // Inside `[task]` the error names the field itself, not just `task`.
        let task = |body: &str| format!("[model]\npreset = \"tiny\"\n[task]\n{body}\n");
        for (text, field, words) in [
            (task("kind = \"arithmetic\"\ndigits = \"two\""), "task.digits", "expected u32"),
            (task("kind = \"arithmetic\"\ndigit = 3"), "task.digit", "unknown field `digit`"),
            (task("kind = \"chess\""), "task.kind", "chess"),
            (task("kind = \"dataset\"\npath = \"a.jsonl\"\nanswer_format = \"latex\""), "task.answer_format", "latex"),
            (task("kind = \"jsonl\"\npath = 3"), "task.path", "expected"),
        ] {
            match JobConfig::from_toml(&text) {
                Err(Error::Config { path, reason }) => {
                    assert_eq!(path, field, "{text}: {reason}");
                    assert!(reason.contains(words), "{text}: {reason}");
                }
                other => panic!("{text}: expected a config error, got {other:?}"),
            }
        }
    }
}
