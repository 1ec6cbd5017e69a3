//! `init-controlled`: data for the controlled noise experiment
//! (`scripts/controlled_experiment.sh`, `docs/controlled.md`).
//!
//! A synthetic task in the phrasing of [`crate::assets::synth`] whose held-out exact
//! match the tiny model can reach in CI time. The tiny model cannot do
//! arithmetic, nor reliably copy numbers or names from a prompt, so every
//! answer is a *looked-up* fact: the size of the package the prompt names
//! (a carton of eggs holds 12, a box of crayons 24, ... — [`PACKAGES`]),
//! never stated in the prompt, learned from the fine-tuning set. Each
//! response reaches it through two or three annotated arithmetic steps
//! (`2 * 12 = <<2*12=24>>24`, ...), so [`synth::inject_noise`] has non-final
//! results to corrupt, and ends with a conclusion that names the package
//! right before its size, then `#### N`. The training responses get noise
//! from that injector (random filler, an extra wrong digit in a non-final
//! result, off-task sentences) at a known rate, and every label token is
//! flagged 0/1 against the injected spans with the trainer's own
//! tokenisation, so a loss mask can be scored against the truth.
//!
//! Written into the output directory:
//! - `base/`: the embedded tiny model ([`crate::assets::tiny::ensure`]); its
//!   tokenizer is the one the flags are computed with;
//! - `train.jsonl`: `prompt`, `response` (noisy), `clean_response`, `answer`;
//! - `train_clean.jsonl`: the same problems with clean responses;
//! - `noise.jsonl`: per training record `{"index", "noise": [0/1 per label
//!   token], "token_kinds": [0 clean, 1 filler, 2 wrong digit, 3 off-task
//!   per label token], "spans": [[start, end], ...], "kinds": [...]}` (label
//!   tokens = response tokens, then EOS = 0; spans are byte ranges of the
//!   noisy response; kinds per [`noise_kind`]);
//! - `oracle_mask.jsonl`: `{"mask": 1 - noise}`, a `[mask] strategy =
//!   "sidecar"` file that masks exactly the injected tokens;
//! - `test.jsonl`: clean held-out problems, GSM8K fields `question` /
//!   `answer` (plus `prompt` / `response`), no prompt shared with training;
//! - `manifest.json`: sizes, seed, target rate, realised byte and token shares.

use crate::assets::synth::cap;
use crate::assets::synth::{self, NoisyResponse, Problem};
use crate::data::tokenizer::Tok;
use crate::data::{self, Record};
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::path::Path;

/// Sizes and noise of one generated experiment.
#[derive(Debug, Clone)]
pub struct ControlledSpec {
    /// Seed of the problems and of the noise.
    pub seed: u64,
    pub n_train: usize,
    pub n_test: usize,
    /// Target share of noise bytes per noisy response (see [`synth::inject_noise`]).
    pub noise_rate: f64,
}

impl Default for ControlledSpec {
    fn default() -> Self {
        Self {
            seed: 7,
            n_train: 240,
            n_test: 100,
            noise_rate: 0.4,
        }
    }
}

/// The prompt template of the experiment's configs (the tiny model's format).
pub const TEMPLATE: &str = crate::assets::tiny::TINY_TEMPLATE;

/// Number of problem families of the controlled task.
pub const N_FAMILIES: usize = 3;

/// The first 16 of `synth`'s names (the set the task was designed with).
const NAMES: &[(&str, bool)] = crate::assets::synth::NAMES.split_at(16).0;

/// Package sizes the task is about, `(item, package, per package)`: the
/// fine-tuning set's "knowledge". Prompts never state the size; every answer
/// is the size of the package the prompt names, so a model answers a held-out
/// problem by recalling the size that goes with the item word.
pub const PACKAGES: [(&str, &str, i64); 8] = [
    ("eggs", "carton", 12),
    ("crayons", "box", 24),
    ("pencils", "pack", 10),
    ("socks", "bag", 6),
    ("cupcakes", "tray", 9),
    ("stickers", "sheet", 20),
    ("marbles", "jar", 30),
    ("batteries", "pack", 4),
];

struct Gen(ChaCha8Rng);

struct Person {
    name: &'static str,
    she: &'static str,
}

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
    /// `k` distinct people.
    fn people(&mut self, k: usize) -> Vec<Person> {
        let mut out: Vec<Person> = Vec::with_capacity(k);
        while out.len() < k {
            let (name, female) = self.pick(NAMES);
            if out.iter().all(|p| p.name != name) {
                let she = if female { "she" } else { "he" };
                out.push(Person { name, she });
            }
        }
        out
    }
}

/// `a op b = <<a op b=c>>c`, the GSM8K annotation `synth` writes.
fn calc(a: i64, op: char, b: i64) -> (i64, String) {
    let c = match op {
        '+' => a + b,
        '-' => a - b,
        '*' => a * b,
        _ => a / b,
    };
    (c, format!("{a} {op} {b} = <<{a}{op}{b}={c}>>{c}"))
}

/// One family's content before the shared scaffolding.
struct Draft {
    prompt: String,
    steps: Vec<String>,
    conclusion: String,
    answer: i64,
}

/// Buys `n` packages, gives `n - 1` away: one package is left.
fn fam_give(g: &mut Gen) -> Draft {
    let ps = g.people(2);
    let (who, she, friend) = (ps[0].name, ps[0].she, ps[1].name);
    let (item, pack, per) = g.pick(&PACKAGES);
    let n = g.int(2, 6);
    let (t, e1) = calc(n, '*', per);
    let (gv, e2) = calc(n - 1, '*', per);
    let (_, e3) = calc(t, '-', gv);
    let packs = |k: i64| {
        if k == 1 {
            pack.to_string()
        } else {
            format!("{pack}s")
        }
    };
    let prompt = if g.chance(0.5) {
        format!(
            "{who} buys {n} {} of {item} and gives {} {} to {friend}. \
             How many {item} does {who} have left?",
            packs(n),
            n - 1,
            packs(n - 1)
        )
    } else {
        format!(
            "{who} has {n} full {} of {item}. {} gives {} {} to {friend}. \
             How many {item} does {who} have now?",
            packs(n),
            cap(she),
            n - 1,
            packs(n - 1)
        )
    };
    Draft {
        prompt,
        steps: vec![
            format!("{who} has {e1} {item}"),
            format!("{she} gives {e2} {item} to {friend}"),
            format!("{who} has {e3} {item} left"),
        ],
        conclusion: format!("{who} has one {pack} of {item}, which is {per} {item}"),
        answer: per,
    }
}

/// Two packages, half of the contents used: one package's worth is left.
fn fam_half(g: &mut Gen) -> Draft {
    let ps = g.people(1);
    let (who, she) = (ps[0].name, ps[0].she);
    let (item, pack, per) = g.pick(&PACKAGES);
    let purpose = g.pick(&[
        "for a school project",
        "at a party",
        "for a craft fair",
        "on a trip",
    ]);
    let (d, e1) = calc(2, '*', per);
    let (_, e2) = calc(d, '/', 2);
    let prompt = if g.chance(0.5) {
        format!(
            "{who} buys two {pack}s of {item}. {} uses half of the {item} {purpose}. \
             How many {item} are left?",
            cap(she)
        )
    } else {
        format!(
            "{who} opened two full {pack}s of {item} and used half of them {purpose}. \
             How many {item} does {she} still have?"
        )
    };
    Draft {
        prompt,
        steps: vec![
            format!("two {pack}s of {item} hold {e1} {item}"),
            format!("after using half, {she} has {e2} {item}"),
        ],
        conclusion: format!("{who} has one {pack} of {item} left, which is {per} {item}"),
        answer: per,
    }
}

/// One package shared out and nothing taken: a plain recall of the size,
/// reached through a total and a difference.
fn fam_lookup(g: &mut Gen) -> Draft {
    let ps = g.people(2);
    let (who, friend) = (ps[0].name, ps[1].name);
    let (item, pack, per) = g.pick(&PACKAGES);
    let k = g.int(2, 5);
    let (t, e1) = calc(per, '+', k);
    let (_, e2) = calc(t, '-', k);
    Draft {
        prompt: format!(
            "{who} has one {pack} of {item}. {friend} gives {who} {k} more {item}, \
             and then {who} gives {k} {item} back. How many {item} does {who} have?"
        ),
        steps: vec![
            format!("with the gift, {who} has {e1} {item}"),
            format!("after giving {k} back, {who} has {e2} {item}"),
        ],
        conclusion: format!("{who} has one {pack} of {item}, which is {per} {item}"),
        answer: per,
    }
}

fn problem(g: &mut Gen) -> Problem {
    let families: [fn(&mut Gen) -> Draft; N_FAMILIES] = [fam_give, fam_half, fam_lookup];
    let d = g.pick(&families)(g);
    // synth's scaffolding, kept short so a tiny model learns it in CI time:
    // the steps (a connector now and then), then a conclusion that names the
    // package right before its size, then `#### N`.
    let mut lines = Vec::with_capacity(d.steps.len() + 2);
    for (i, step) in d.steps.iter().enumerate() {
        let conn = if i > 0 && g.chance(0.3) {
            g.pick(&["So, ", "Then, ", "Next, "])
        } else {
            ""
        };
        lines.push(cap(&format!("{conn}{step}.")));
    }
    lines.push(format!("Therefore, {}.", d.conclusion));
    lines.push(format!("#### {}", d.answer));
    Problem {
        prompt: d.prompt,
        response: lines.join("\n"),
        answer: d.answer,
    }
}

/// `n` problems of the controlled task from one seeded stream.
pub fn generate(n: usize, seed: u64) -> Vec<Problem> {
    let mut g = Gen(ChaCha8Rng::seed_from_u64(seed));
    (0..n).map(|_| problem(&mut g)).collect()
}

/// Training problems and disjoint held-out problems: the test stream uses
/// another seed and skips any prompt that occurs in training.
pub fn split(spec: &ControlledSpec) -> (Vec<Problem>, Vec<Problem>) {
    let train = generate(spec.n_train, spec.seed);
    let seen: BTreeSet<&str> = train.iter().map(|p| p.prompt.as_str()).collect();
    let mut g = Gen(ChaCha8Rng::seed_from_u64(spec.seed ^ 0x07e5_75e7_u64));
    let mut test: Vec<Problem> = Vec::with_capacity(spec.n_test);
    while test.len() < spec.n_test {
        let p = problem(&mut g);
        if !seen.contains(p.prompt.as_str()) && test.iter().all(|t| t.prompt != p.prompt) {
            test.push(p);
        }
    }
    (train, test)
}

/// The noise seed of training record `index` (varied per record, as
/// [`synth::inject_noise`] asks).
pub fn noise_seed(seed: u64, index: usize) -> u64 {
    (seed ^ 0x4e01_5e00).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index as u64
}

/// Byte range `[start, end)` of every token of `ids` in their decoded text,
/// which must equal `text` (the byte-level BPE round trip is exact).
pub fn token_spans(tok: &Tok, ids: &[u32], text: &str) -> Result<Vec<(usize, usize)>> {
    let mut spans = Vec::with_capacity(ids.len());
    let mut at = 0;
    for k in 0..ids.len() {
        // The prefix decode, not the single token, so a UTF-8 character split
        // across tokens still lands at a character boundary in the end.
        let end = tok.decode(&ids[..=k])?.len();
        spans.push((at.min(end), end));
        at = end;
    }
    if at != text.len() || tok.decode(ids)? != text {
        return Err(Error::Msg(format!(
            "tokenizer round trip is not exact for {text:?}"
        )));
    }
    Ok(spans)
}

/// 0/1 per label token of `noisy.response` as the trainer tokenises it
/// (response tokens, then EOS): 1 when the token's bytes overlap a noise span.
/// The last entry (EOS) is always 0.
pub fn noise_flags(tok: &Tok, noisy: &NoisyResponse) -> Result<Vec<u8>> {
    let ids = tok.encode(&noisy.response)?;
    let spans = token_spans(tok, &ids, &noisy.response)?;
    let mut flags: Vec<u8> = spans
        .iter()
        .map(|&(s, e)| noisy.is_noise(s, e) as u8)
        .collect();
    flags.push(0);
    Ok(flags)
}

fn jsonl(rows: impl Iterator<Item = serde_json::Value>) -> String {
    let mut text = String::new();
    for r in rows {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    text
}

/// Realised noise of a generated training set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NoiseStats {
    pub noise_bytes: usize,
    pub response_bytes: usize,
    pub noise_label_tokens: usize,
    pub label_tokens: usize,
    pub noisy_examples: usize,
    /// Label tokens that are the extra digit of a corrupted non-final result
    /// (token overlapping a one-digit span).
    pub wrong_digit_tokens: usize,
    /// Noise bytes and pieces by kind: `[filler, wrong_digit, off_task]`.
    pub kind_bytes: [usize; 3],
    pub kind_pieces: [usize; 3],
}

/// The filler words of [`synth::inject_noise`] (lowercase).
const FILLER_WORDS: [&str; 10] = [
    "um",
    "like",
    "basically",
    "actually",
    "you know",
    "so yeah",
    "hmm",
    "right",
    "well",
    "okay",
];

/// Which kind of noise an injected piece is: 0 = random filler (" Um, like."),
/// 1 = a wrong digit, 2 = an off-task sentence.
pub fn noise_kind(piece: &str) -> usize {
    if piece.len() == 1 && piece.as_bytes()[0].is_ascii_digit() {
        return 1;
    }
    let body = piece.trim().trim_end_matches('.').to_ascii_lowercase();
    match body.split(", ").all(|w| FILLER_WORDS.contains(&w)) {
        true => 0,
        false => 2,
    }
}

/// Create the experiment in `dir` (see the module docs): the base model in
/// `dir/base` unless already there, then the data with its tokenizer.
pub fn init(dir: &Path, spec: &ControlledSpec) -> Result<NoiseStats> {
    crate::assets::tiny::ensure(&dir.join("base"))?;
    let tok = Tok::load(&dir.join("base/model"))?;
    write_data(dir, spec, &tok)
}

/// Write the data files of the experiment into `dir`, flagging noise with
/// `tok` (the base model's tokenizer). Fails if any record's flags and the
/// trainer's label tokens disagree in number.
pub fn write_data(dir: &Path, spec: &ControlledSpec, tok: &Tok) -> Result<NoiseStats> {
    let (train, test) = split(spec);
    let noisy: Vec<NoisyResponse> = train
        .iter()
        .enumerate()
        .map(|(i, p)| synth::inject_noise(p, spec.noise_rate, noise_seed(spec.seed, i)))
        .collect();
    let (flags, stats) = flag_noise(&train, &noisy, tok)?;

    let rows = train.iter().zip(&noisy).map(|(p, n)| {
        serde_json::json!({
            "prompt": p.prompt, "response": n.response,
            "clean_response": p.response, "answer": p.answer,
        })
    });
    crate::io::write_atomic(&dir.join("train.jsonl"), jsonl(rows).as_bytes())?;
    let rows = train.iter().map(
        |p| serde_json::json!({"prompt": p.prompt, "response": p.response, "answer": p.answer}),
    );
    crate::io::write_atomic(&dir.join("train_clean.jsonl"), jsonl(rows).as_bytes())?;
    let rows = noise_rows(&flags, &noisy, tok)?;
    crate::io::write_atomic(&dir.join("noise.jsonl"), jsonl(rows.into_iter()).as_bytes())?;
    let rows = flags
        .iter()
        .map(|f| serde_json::json!({"mask": f.iter().map(|&x| 1 - x).collect::<Vec<u8>>()}));
    crate::io::write_atomic(&dir.join("oracle_mask.jsonl"), jsonl(rows).as_bytes())?;
    let rows = test.iter().map(|p| {
        serde_json::json!({
            "question": p.prompt, "answer": p.response,
            "prompt": p.prompt, "response": p.response,
        })
    });
    crate::io::write_atomic(&dir.join("test.jsonl"), jsonl(rows).as_bytes())?;
    let manifest = serde_json::json!({
        "seed": spec.seed,
        "n_train": spec.n_train,
        "n_test": spec.n_test,
        "noise_rate_target": spec.noise_rate,
        "noise_byte_share": stats.noise_bytes as f64 / stats.response_bytes.max(1) as f64,
        "noise_label_token_share": stats.noise_label_tokens as f64 / stats.label_tokens.max(1) as f64,
        "stats": stats,
        "template": TEMPLATE,
    });
    crate::io::write_json(&dir.join("manifest.json"), &manifest)?;
    Ok(stats)
}

/// Per-label-token noise flags of every training response, checked against
/// the trainer's own tokenisation, and the statistics of the injected noise.
fn flag_noise(
    train: &[Problem],
    noisy: &[NoisyResponse],
    tok: &Tok,
) -> Result<(Vec<Vec<u8>>, NoiseStats)> {
    let mut flags = Vec::with_capacity(train.len());
    let mut stats = NoiseStats {
        noise_bytes: 0,
        response_bytes: 0,
        noise_label_tokens: 0,
        label_tokens: 0,
        noisy_examples: 0,
        wrong_digit_tokens: 0,
        kind_bytes: [0; 3],
        kind_pieces: [0; 3],
    };
    for (p, n) in train.iter().zip(noisy) {
        let f = noise_flags(tok, n)?;
        // The trainer's own tokenisation must give exactly as many labels.
        let rec = Record::pair(p.prompt.clone(), n.response.clone());
        let (ex, _) = data::tokenize_one(&rec, tok, TEMPLATE, usize::MAX)?;
        let n_labels = ex.map(|e| e.n_labels()).unwrap_or(0);
        if n_labels != f.len() {
            return Err(Error::Msg(format!(
                "noise flags ({}) and label tokens ({n_labels}) disagree for {:?}",
                f.len(),
                n.response
            )));
        }
        let ids = tok.encode(&n.response)?;
        let spans = token_spans(tok, &ids, &n.response)?;
        stats.wrong_digit_tokens += spans
            .iter()
            .filter(|&&(s, e)| {
                n.noise_spans
                    .iter()
                    .any(|&(a, b)| b - a == 1 && s < b && a < e)
            })
            .count();
        stats.noise_bytes += n.noise_len();
        stats.response_bytes += n.response.len();
        stats.noise_label_tokens += f.iter().map(|&x| x as usize).sum::<usize>();
        stats.label_tokens += f.len();
        stats.noisy_examples += !n.noise_spans.is_empty() as usize;
        for &(a, b) in &n.noise_spans {
            let k = noise_kind(&n.response[a..b]);
            stats.kind_bytes[k] += b - a;
            stats.kind_pieces[k] += 1;
        }
        flags.push(f);
    }
    Ok((flags, stats))
}

/// `noise.jsonl`'s rows: the flags, each label token's noise kind (0 =
/// clean, else kind + 1; the EOS label is clean) and the injected spans.
fn noise_rows(
    flags: &[Vec<u8>],
    noisy: &[NoisyResponse],
    tok: &Tok,
) -> Result<Vec<serde_json::Value>> {
    let mut rows = Vec::with_capacity(flags.len());
    for (i, (f, n)) in flags.iter().zip(noisy).enumerate() {
        let kinds: Vec<usize> = n
            .noise_spans
            .iter()
            .map(|&(a, b)| noise_kind(&n.response[a..b]))
            .collect();
        let ids = tok.encode(&n.response)?;
        let mut token_kinds: Vec<usize> = token_spans(tok, &ids, &n.response)?
            .iter()
            .map(|&(s, e)| {
                let hit = n.noise_spans.iter().position(|&(a, b)| s < b && a < e);
                hit.map_or(0, |j| kinds[j] + 1)
            })
            .collect();
        token_kinds.push(0);
        rows.push(serde_json::json!({
            "index": i, "noise": f, "token_kinds": token_kinds,
            "spans": n.noise_spans, "kinds": kinds,
        }));
    }
    Ok(rows)
}
