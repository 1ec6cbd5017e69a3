//! Controlled noise: filler and off-task sentences, and corrupted
//! intermediate numbers, inserted into a clean response at a given rate, with
//! the injected byte ranges recorded.

use super::{cap, NoisyResponse, Problem};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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

const OFF_TASK: [&str; 12] = [
    "The weather was sunny and warm that afternoon.",
    "It might rain later, so bring an umbrella.",
    "A good pancake batter needs two eggs and a cup of milk.",
    "Banana bread tastes best with very ripe bananas.",
    "My favorite color has always been green.",
    "The local football team won their game last night.",
    "Cats usually sleep for most of the day.",
    "Tomato soup is easy to make with fresh basil.",
    "The museum downtown opens at nine on weekends.",
    "Remember to water the plants on Sunday.",
    "The sky looked very cloudy this morning.",
    "Pizza dough should rest for about an hour.",
];

/// Insert noise into `problem.response` until about `rate` of the noisy
/// response's bytes are noise (`rate` is clamped to [0, 0.9]).
///
/// Kinds, all insertions (see [`NoisyResponse`]): a run of filler words or an
/// off-task sentence after a sentence end (each starts with a space, so it
/// tokenises into whole tokens), or one extra digit inside the visible result
/// of a non-final annotation (`<<48/2=24>>24` becomes `<<48/2=24>>214`); the
/// annotation itself and the `#### N` line are never touched. The last piece
/// is kept at random so that the expected noise equals the target: the rate is
/// met on average over many responses, not exactly per response. Callers should vary
/// `seed` per problem (e.g. `seed ^ index`).
pub fn inject_noise(problem: &Problem, rate: f64, seed: u64) -> NoisyResponse {
    let clean = problem.response.as_str();
    let rate = rate.clamp(0.0, 0.9);
    let target = rate / (1.0 - rate) * clean.len() as f64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let boundaries = sentence_ends(clean);
    let mut numbers = intermediate_numbers(clean);
    // (position in the clean text, inserted text), in insertion order.
    let mut inserts: Vec<(usize, String)> = Vec::new();
    let mut noise = 0.0;
    while noise < target && !boundaries.is_empty() {
        let roll = rng.gen_range(0..10u32);
        let (pos, text) = if roll < 2 && !numbers.is_empty() {
            let (start, end) = numbers[rng.gen_range(0..numbers.len() as u32) as usize];
            let pos = rng.gen_range(start as u32..=end as u32) as usize;
            let lo = if pos == start { 1 } else { 0 };
            numbers.retain(|&(s, _)| s != start); // one wrong digit per number
            (pos, char::from(b'0' + rng.gen_range(lo..10u8)).to_string())
        } else {
            let pos = boundaries[rng.gen_range(0..boundaries.len() as u32) as usize];
            (pos, noise_sentence(&mut rng, roll < 6))
        };
        // A piece that would overshoot is kept with probability gap/len and
        // ends the loop, so the expected noise equals the target exactly.
        let (len, gap) = (text.len() as f64, target - noise);
        let fits = len <= gap;
        if fits || rng.gen_bool(gap / len) {
            noise += len;
            inserts.push((pos, text));
        }
        if !fits {
            break;
        }
    }
    apply_inserts(clean, inserts)
}

/// Splice insertions into `clean`, recording where each lands in the result.
fn apply_inserts(clean: &str, mut inserts: Vec<(usize, String)>) -> NoisyResponse {
    inserts.sort_by_key(|(pos, _)| *pos); // stable: same-position pieces keep their order
    let mut response =
        String::with_capacity(clean.len() + inserts.iter().map(|(_, t)| t.len()).sum::<usize>());
    let mut noise_spans = Vec::with_capacity(inserts.len());
    let mut at = 0;
    for (pos, text) in inserts {
        response.push_str(&clean[at..pos]);
        at = pos;
        noise_spans.push((response.len(), response.len() + text.len()));
        response.push_str(&text);
    }
    response.push_str(&clean[at..]);
    NoisyResponse {
        response,
        noise_spans,
    }
}

/// " Um, basically, okay." or an off-task sentence, with a leading space.
fn noise_sentence(rng: &mut ChaCha8Rng, filler: bool) -> String {
    if !filler {
        return format!(
            " {}",
            OFF_TASK[rng.gen_range(0..OFF_TASK.len() as u32) as usize]
        );
    }
    let n = rng.gen_range(2..=4u32) as usize;
    let mut words: Vec<&str> = Vec::with_capacity(n);
    while words.len() < n {
        let w = FILLER_WORDS[rng.gen_range(0..FILLER_WORDS.len() as u32) as usize];
        if !words.contains(&w) {
            words.push(w);
        }
    }
    format!(" {}.", cap(&words.join(", ")))
}

/// Byte positions just after a sentence-ending `.`/`?`/`!` that is followed by
/// a space or newline, before the `#### N` line.
fn sentence_ends(text: &str) -> Vec<usize> {
    let limit = text.rfind("\n####").unwrap_or(text.len());
    let b = text.as_bytes();
    (1..=limit)
        .filter(|&i| {
            matches!(b[i - 1], b'.' | b'?' | b'!') && (i == limit || matches!(b[i], b' ' | b'\n'))
        })
        .collect()
}

/// Byte ranges of the visible results right after `>>`, except the last one
/// (the final answer).
fn intermediate_numbers(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut out: Vec<(usize, usize)> = text
        .match_indices(">>")
        .map(|(i, _)| {
            let start = i + 2;
            let len = b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
            (start, start + len)
        })
        .filter(|(s, e)| e > s)
        .collect();
    out.pop();
    out
}
