//! The embedded default's data: synthetic GSM8K-style word problems, a
//! controlled noise injector, and a byte-level BPE tokenizer trained on them.
//!
//! Everything here runs offline and is a pure function of its seed, so
//! `init-tiny` produces byte-identical artefacts on every machine. Randomness
//! comes only from `ChaCha8Rng` (portable output), integers are drawn as `i64` /
//! `u32` (never `usize`, whose sampling depends on the pointer width), and no
//! output depends on `HashMap` iteration order.
//!
//! The problems are deliberately regular: twelve problem families, each with a
//! couple of phrasings, and responses built from a small set of fillers
//! ("First, let's figure out ...", "So,", "Therefore, ..."). A tiny model
//! pre-trained for a minute then predicts many tokens with high confidence,
//! which the knowledge-novelty filter needs to see, while numbers and names
//! stay genuinely uncertain.

//!
//! Rooms: problem generation and its shared scaffolding (here), the twelve
//! problem families ([`families`]), the noise injector ([`noise`]) and the
//! tokenizer trainer ([`tokenizer`]).

mod families;
mod noise;
mod tokenizer;

pub use noise::inject_noise;
pub use tokenizer::train_tokenizer;

use families::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Special tokens in id order: `<pad>` = 0, `<s>` (BOS) = 1, `</s>` (EOS) = 2.
pub const SPECIAL_TOKENS: [&str; 3] = ["<pad>", "<s>", "</s>"];

/// Smallest vocabulary a byte-level BPE can have: the specials plus all 256 bytes.
pub const MIN_VOCAB_SIZE: usize = SPECIAL_TOKENS.len() + 256;

/// The tiny model's vocabulary: 259 base entries plus 253 merges, enough for
/// whole common words and numbers of this corpus.
pub const DEFAULT_VOCAB_SIZE: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(
        "vocab_size {vocab_size} is below the {MIN_VOCAB_SIZE} entries a byte-level BPE needs \
        (3 special tokens + 256 bytes)"
    )]
    VocabTooSmall { vocab_size: usize },
    #[error("no training text for the tokenizer")]
    EmptyCorpus,
    #[error("tokenizer training failed: {0}")]
    Tokenizer(tokenizers::Error),
}

/// One GSM8K-style record. `response` ends with the line `#### {answer}`, and
/// every `<<a op b=c>>` annotation in it is exact integer arithmetic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub prompt: String,
    pub response: String,
    pub answer: i64,
}

/// A response with injected noise and where that noise is.
///
/// Every noise piece is an *insertion*: a sentence after a sentence end, or one
/// extra digit inside an intermediate number (`24` becomes `274`). The clean
/// response is therefore exactly the noisy one with the spans removed
/// ([`NoisyResponse::without_noise`]), which is the invariant the tests check.
/// Spans are byte ranges `[start, end)` into `response`, sorted and disjoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoisyResponse {
    pub response: String,
    pub noise_spans: Vec<(usize, usize)>,
}

impl NoisyResponse {
    /// The response with every noise span cut out: the original clean text.
    pub fn without_noise(&self) -> String {
        let mut out = String::with_capacity(self.response.len());
        let mut at = 0;
        for &(s, e) in &self.noise_spans {
            out.push_str(&self.response[at..s]);
            at = e;
        }
        out.push_str(&self.response[at..]);
        out
    }

    /// Whether the byte range `[start, end)` (e.g. a token's offsets) touches noise.
    /// A token counts as noise if any of its bytes is noise; an inserted sentence
    /// starts with its own space, so byte-level tokens rarely straddle a boundary.
    pub fn is_noise(&self, start: usize, end: usize) -> bool {
        self.noise_spans.iter().any(|&(s, e)| start < e && s < end)
    }

    /// Bytes of noise, for measuring the realised rate.
    pub fn noise_len(&self) -> usize {
        self.noise_spans.iter().map(|(s, e)| e - s).sum()
    }
}

// ---------------------------------------------------------------------------
// Problem generation
// ---------------------------------------------------------------------------

/// `n` problems from one seeded stream. Problems are drawn in order, so
/// `generate_problems(n, s)` is a prefix of `generate_problems(m, s)` for m > n.
pub fn generate_problems(n: usize, seed: u64) -> Vec<Problem> {
    let all: Vec<usize> = (0..N_FAMILIES).collect();
    generate_problems_in(n, seed, &all)
}

/// Number of problem families (wages, discounts, distances, ...).
pub const N_FAMILIES: usize = 12;

/// Like [`generate_problems`], drawing only from the given family indices
/// (`< N_FAMILIES`). The tiny base model is pre-trained on a subset so that
/// fine-tuning on all families has something new to teach.
pub fn generate_problems_in(n: usize, seed: u64, families: &[usize]) -> Vec<Problem> {
    let mut g = Gen(ChaCha8Rng::seed_from_u64(seed));
    (0..n).map(|_| g.problem(families)).collect()
}

/// A family's output before the shared response scaffolding is added.
struct Draft {
    prompt: String,
    /// Sub-question for the optional "First, let's figure out ..." opener.
    first: String,
    /// Reasoning sentences without end punctuation; may start lowercase.
    steps: Vec<String>,
    /// The answer restated as a sentence body, for the "Therefore, ..." line.
    conclusion: String,
    answer: i64,
}

#[derive(Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

/// Exact arithmetic; families pick operands so that `Div` has no remainder.
/// Returns the result and the GSM8K text `a op b = <<a op b=c>>c`. With
/// `dollars`, money operands and the result get a `$` (both operands of +/-,
/// the first of * and /), the way GSM8K writes `$12 * 5 = $<<12*5=60>>60`.
fn calc(a: i64, op: Op, b: i64, dollars: bool) -> (i64, String) {
    let (c, sym) = match op {
        Op::Add => (a + b, '+'),
        Op::Sub => (a - b, '-'),
        Op::Mul => (a * b, '*'),
        Op::Div => (a / b, '/'),
    };
    debug_assert!(!matches!(op, Op::Div) || a % b == 0, "inexact {a}/{b}");
    let d = if dollars { "$" } else { "" };
    let db = if dollars && matches!(op, Op::Add | Op::Sub) {
        "$"
    } else {
        ""
    };
    (
        c,
        format!("{d}{a} {sym} {db}{b} = {d}<<{a}{sym}{b}={c}>>{c}"),
    )
}

pub(crate) fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

/// A named person with pronouns (subject, object, possessive).
#[derive(Clone, Copy)]
struct Person {
    name: &'static str,
    she: &'static str,
    her: &'static str,
    his: &'static str,
}

/// First names with whether "she" applies; shared with `controlled`.
pub(crate) const NAMES: [(&str, bool); 24] = [
    ("Natalia", true),
    ("James", false),
    ("Maria", true),
    ("Tom", false),
    ("Aisha", true),
    ("Carlos", false),
    ("Emma", true),
    ("Liam", false),
    ("Sofia", true),
    ("Noah", false),
    ("Mei", true),
    ("Omar", false),
    ("Hannah", true),
    ("Ben", false),
    ("Priya", true),
    ("Lucas", false),
    ("Julia", true),
    ("Ethan", false),
    ("Grace", true),
    ("Mark", false),
    ("Zoe", true),
    ("Ravi", false),
    ("Olivia", true),
    ("Jack", false),
];

struct Gen(ChaCha8Rng);

impl Gen {
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        self.0.gen_range(lo..=hi)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.0.gen_range(0..xs.len() as u32) as usize]
    }

    fn chance(&mut self, p: f64) -> bool {
        self.0.gen_bool(p)
    }

    fn person(&mut self) -> Person {
        let (name, female) = self.pick(&NAMES);
        let (she, her, his) = if female {
            ("she", "her", "her")
        } else {
            ("he", "him", "his")
        };
        Person {
            name,
            she,
            her,
            his,
        }
    }

    fn problem(&mut self, allowed: &[usize]) -> Problem {
        let families: [fn(&mut Gen) -> Draft; N_FAMILIES] = [
            fam_fraction,
            fam_change,
            fam_wage,
            fam_discount,
            fam_progress,
            fam_distance,
            fam_share,
            fam_savings,
            fam_boxes,
            fam_ages,
            fam_percent_group,
            fam_production,
        ];
        let pool: Vec<fn(&mut Gen) -> Draft> = allowed
            .iter()
            .filter_map(|&i| families.get(i).copied())
            .collect();
        let draft = self.pick(if pool.is_empty() {
            &families[..]
        } else {
            &pool
        })(self);
        self.assemble(draft)
    }

    /// Wrap a family's steps in the shared scaffolding: an optional opener,
    /// optional connectors, an optional restating conclusion, and `#### N`.
    fn assemble(&mut self, d: Draft) -> Problem {
        let mut lines = Vec::with_capacity(d.steps.len() + 3);
        match self.int(0, 9) {
            0..=3 => lines.push(format!("First, let's figure out {}.", d.first)),
            4..=5 => lines.push("Let's solve this step by step.".to_string()),
            _ => {}
        }
        for (i, step) in d.steps.iter().enumerate() {
            let conn = if i > 0 && self.chance(0.3) {
                self.pick(&["So, ", "Then, ", "Next, "])
            } else {
                ""
            };
            lines.push(cap(&format!("{conn}{step}.")));
        }
        match self.int(0, 3) {
            0 | 1 => lines.push(format!("Therefore, {}.", d.conclusion)),
            2 => lines.push(format!("So the answer is {}.", d.answer)),
            _ => {}
        }
        lines.push(format!("#### {}", d.answer));
        Problem {
            prompt: d.prompt,
            response: lines.join("\n"),
            answer: d.answer,
        }
    }
}
