//! `report.html`: a self-contained page (inline SVG and CSS, no network)
//! that shows *why* tokens were dropped — score histograms with cut-offs, the
//! overlap of the three noise sets, coloured example tokens with their scores
//! on hover, the most masked tokens and, after training, the loss curve.

use crate::data::tokenizer::Tok;
use crate::data::Example;
use crate::xtf::mask::XtfMask;
use crate::xtf::score::TokenScores;
use crate::xtf::summary::Summary;
use std::fmt::Write;

/// One point of the report's loss curve (a training step's loss, and the
/// eval loss when evaluated there).
#[derive(Debug, Clone, Copy)]
pub struct LossPoint {
    pub step: usize,
    pub loss: f64,
    pub eval_loss: Option<f64>,
}

/// Everything the page shows.
pub struct ReportInput<'a> {
    pub summary: &'a Summary,
    pub mask: &'a XtfMask,
    pub scores: &'a [TokenScores],
    pub examples: &'a [Example],
    pub tok: &'a Tok,
    pub metrics: &'a [LossPoint],
    pub title: &'a str,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Colours of the seven flag combinations (RI, KN, TR bits).
const COLOURS: [&str; 8] = [
    "transparent",
    "#f4a3a3",
    "#9fc5f8",
    "#c39bd3",
    "#a8e0a0",
    "#f7c98b",
    "#8fd3cf",
    "#bdbdbd",
];
const LABELS: [&str; 8] = [
    "kept", "RI", "KN", "RI+KN", "TR", "RI+TR", "KN+TR", "RI+KN+TR",
];

fn combo(ri: bool, kn: bool, tr: bool) -> usize {
    ri as usize | (kn as usize) << 1 | (tr as usize) << 2
}

/// A histogram of `values` with vertical cut-off lines.
fn histogram(title: &str, values: &[f32], cuts: &[(f64, &str)], log_y: bool) -> String {
    let (w, h, pad) = (420.0, 180.0, 30.0);
    let mut svg = format!(
        "<figure><figcaption>{}</figcaption><svg width=\"{w}\" height=\"{}\" role=\"img\">",
        esc(title),
        h + pad
    );
    if values.is_empty() {
        return svg + "</svg></figure>";
    }
    let lo = values.iter().fold(f32::INFINITY, |a, &b| a.min(b)) as f64;
    let hi = values.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let span = if hi > lo { hi - lo } else { 1.0 };
    let bins = 60;
    let mut counts = vec![0usize; bins];
    for &v in values {
        let b = (((v as f64 - lo) / span) * bins as f64) as usize;
        counts[b.min(bins - 1)] += 1;
    }
    let scale = |c: usize| {
        if log_y {
            (c as f64 + 1.0).ln()
        } else {
            c as f64
        }
    };
    let top = counts
        .iter()
        .map(|&c| scale(c))
        .fold(0.0, f64::max)
        .max(1e-9);
    let bw = (w - 2.0 * pad) / bins as f64;
    for (i, &c) in counts.iter().enumerate() {
        let bh = scale(c) / top * (h - pad);
        let _ = write!(svg, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#5b7db1\"><title>{c}</title></rect>", pad + i as f64 * bw, h - bh, bw.max(1.0) - 0.5);
    }
    let _ = write!(
        svg,
        "<line x1=\"{pad}\" y1=\"{h}\" x2=\"{}\" y2=\"{h}\" stroke=\"#333\"/>",
        w - pad
    );
    let _ = write!(svg, "<text x=\"{pad}\" y=\"{}\" class=\"ax\">{lo:.3e}</text><text x=\"{}\" y=\"{}\" class=\"ax\" text-anchor=\"end\">{hi:.3e}</text>", h + 14.0, w - pad, h + 14.0);
    for (c, label) in cuts {
        let x = pad + (c - lo) / span * (w - 2.0 * pad);
        if (pad..=w - pad).contains(&x) {
            let _ = write!(svg, "<line x1=\"{x:.1}\" y1=\"4\" x2=\"{x:.1}\" y2=\"{h}\" stroke=\"#c0392b\" stroke-width=\"2\" stroke-dasharray=\"4 2\"/><text x=\"{:.1}\" y=\"12\" class=\"cut\">{}</text>", x + 3.0, esc(label));
        } else {
            let _ = write!(svg, "<text x=\"{}\" y=\"{}\" class=\"cut\" text-anchor=\"end\">{} = {c:.3e} (outside range)</text>", w - pad, 12.0, esc(label));
        }
    }
    svg + "</svg></figure>"
}

/// Loss (and eval loss) against optimizer step.
fn loss_curve(m: &[LossPoint]) -> String {
    if m.is_empty() {
        return "<p>No training metrics yet (run training to see the loss curve).</p>".into();
    }
    let (w, h, pad) = (640.0, 220.0, 36.0);
    let max_step = m.iter().map(|x| x.step).max().unwrap_or(1).max(1) as f64;
    let ys = m
        .iter()
        .map(|x| x.loss)
        .chain(m.iter().filter_map(|x| x.eval_loss));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let px = |s: usize| pad + s as f64 / max_step * (w - 2.0 * pad);
    let py = |y: f64| h - pad - (y - lo) / span * (h - 2.0 * pad);
    let line = |pts: Vec<(usize, f64)>, colour: &str| {
        let d: Vec<String> = pts
            .iter()
            .map(|&(s, y)| format!("{:.1},{:.1}", px(s), py(y)))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            d.join(" ")
        )
    };
    let mut svg = format!("<svg width=\"{w}\" height=\"{h}\" role=\"img\">");
    svg += &line(m.iter().map(|x| (x.step, x.loss)).collect(), "#5b7db1");
    let ev: Vec<(usize, f64)> = m
        .iter()
        .filter_map(|x| x.eval_loss.map(|e| (x.step, e)))
        .collect();
    for &(s, e) in &ev {
        let _ = write!(svg, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#e67e22\"><title>step {s}: eval_loss {e:.4}</title></circle>", px(s), py(e));
    }
    svg += &line(ev, "#e67e22");
    let _ = write!(svg, "<text x=\"{pad}\" y=\"14\" class=\"ax\">{hi:.3}</text><text x=\"{pad}\" y=\"{}\" class=\"ax\">{lo:.3}</text><text x=\"{}\" y=\"{}\" class=\"ax\" text-anchor=\"end\">step {max_step}</text>", h - pad + 14.0, w - pad, h - 6.0);
    svg + "</svg><p><span style=\"color:#5b7db1\">&#9632;</span> train loss (masked) <span style=\"color:#e67e22\">&#9679;</span> eval loss</p>"
}

/// Exclusive regions of the three noise sets, UpSet-style.
fn overlap_bars(m: &XtfMask) -> String {
    let mut counts = [0usize; 8];
    for ((r, k), t) in m
        .noise_ri
        .iter()
        .flatten()
        .zip(m.noise_kn.iter().flatten())
        .zip(m.noise_tr.iter().flatten())
    {
        counts[combo(*r, *k, *t)] += 1;
    }
    let max = counts[1..].iter().copied().max().unwrap_or(0).max(1) as f64;
    let mut s = String::from("<table class=\"bars\">");
    for c in 1..8 {
        let width = 300.0 * counts[c] as f64 / max;
        let _ = write!(s, "<tr><td>{} only</td><td><div class=\"bar\" style=\"width:{width:.0}px;background:{}\"></div></td><td>{}</td></tr>", LABELS[c], COLOURS[c], counts[c]);
    }
    s + "</table>"
}

fn token_html(tok: &Tok, id: u32) -> String {
    esc(&tok.token_str(id))
        .replace('\n', "&#8629;<br>")
        .replace(' ', "&nbsp;")
}

/// Examples with each label token coloured by the attribute(s) that flagged it.
fn examples_html(r: &ReportInput, limit: usize) -> String {
    let n = r.examples.len();
    let step = (n / limit.max(1)).max(1);
    let mut s = String::new();
    for i in (0..n).step_by(step).take(limit) {
        let e = &r.examples[i];
        let _ = write!(
            s,
            "<div class=\"ex\"><div class=\"exh\">example {i}</div><span class=\"prompt\">"
        );
        for &id in &e.ids[..e.label_start] {
            s += &token_html(r.tok, id);
        }
        s += "</span>";
        for (k, &id) in e.ids[e.label_start..].iter().enumerate() {
            let (ri, kn, tr) = (
                r.mask.noise_ri[i][k],
                r.mask.noise_kn[i][k],
                r.mask.noise_tr[i][k],
            );
            let c = combo(ri, kn, tr);
            let kept = r.mask.keep[i][k];
            let sc = &r.scores[i];
            let _ = write!(
                s,
                "<span class=\"t{}\" style=\"background:{}\" title=\"{} | S_RI {:.4e} | S_KN {:.4} | S_TR {:.4} | flagged: {} | {}\">{}</span>",
                if kept { "" } else { " m" },
                COLOURS[c],
                esc(&format!("{:?}", r.tok.token_str(id))),
                sc.ri[k],
                sc.kn[k],
                r.mask.s_tr[i][k],
                LABELS[c],
                if kept { "kept" } else { "masked" },
                token_html(r.tok, id)
            );
        }
        s += "</div>";
    }
    s
}

/// Render the whole page.
pub fn render(r: &ReportInput) -> String {
    let mut h = String::new();
    let _ = write!(h, "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{CSS}</style></head><body>", esc(r.title));
    let _ = write!(h, "<h1>{}</h1>", esc(r.title));
    h += &summary_html(r.summary);
    h += "<h2>Score distributions and cut-offs</h2><div class=\"row\">";
    h += &histograms_html(r);
    h += "</div><h2>Overlap of the noise sets</h2><div class=\"row\"><div>";
    h += &overlap_bars(r.mask);
    h += "</div><table class=\"stats\"><tr><th>sets</th><th>count</th><th>share</th><th>Jaccard</th></tr>";
    for o in &r.summary.overlaps {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{:.2}%</td><td>{:.3}</td></tr>",
            o.sets,
            o.count,
            100.0 * o.share,
            o.jaccard
        );
    }
    h += "</table></div><h2>Examples</h2><p class=\"legend\">";
    for c in 1..8 {
        let _ = write!(
            h,
            "<span class=\"t\" style=\"background:{}\">{}</span> ",
            COLOURS[c], LABELS[c]
        );
    }
    h += "<span class=\"t m\">masked</span> <span class=\"prompt\">prompt (never trained)</span> — hover a token for its scores.</p>";
    h += &examples_html(r, 12);
    h += "<h2>Most often masked tokens</h2><table class=\"stats\"><tr><th>token</th><th>id</th><th>count</th></tr>";
    for t in r.summary.top_masked.iter().take(20) {
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            esc(&format!("{:?}", t.token)),
            t.id,
            t.count
        );
    }
    h += "</table><h2>Training loss</h2>";
    h += &loss_curve(r.metrics);
    h += "</body></html>\n";
    h
}

/// The headline and the per-attribute table, with the summary's notes.
fn summary_html(sm: &Summary) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<p class=\"big\">{} of {} label tokens masked ({:.2}%) in {} examples; EOS masked in {:.1}% of examples{}.</p>",
        sm.masked, sm.label_tokens, 100.0 * sm.masked_share, sm.examples, 100.0 * sm.eos_masked_share, if sm.protect_eos { " (protect_eos on)" } else { "" }
    );
    h += "<table class=\"stats\"><tr><th>attribute</th><th>enabled</th><th>flagged by the rule</th><th>share</th><th>per-example cap</th><th>flagged after the cap</th><th>share</th></tr>";
    for (n, a) in [
        ("reasoning importance (RI)", &sm.ri),
        ("knowledge novelty (KN)", &sm.kn),
        ("task relevance (TR)", &sm.tr),
    ] {
        let _ = write!(
            h,
            "<tr><td>{n}</td><td>{}</td><td>{}</td><td>{:.2}%</td><td>{}</td><td>{}</td><td>{:.2}%</td></tr>",
            if a.enabled { "yes" } else { "no" },
            a.flagged_before_cap,
            100.0 * a.share_before_cap,
            a.max_share.map_or("none".into(), |c| format!("{:.0}%", 100.0 * c)),
            a.flagged,
            100.0 * a.share
        );
    }
    h += "</table>";
    for note in sm.ri_note.iter().chain(&sm.cutoffs.tr_warning) {
        let _ = write!(h, "<p class=\"note\">{}</p>", esc(note));
    }
    h
}

/// The three score histograms with their cut-offs marked.
fn histograms_html(r: &ReportInput) -> String {
    let sm = r.summary;
    let flat = |f: &dyn Fn(&TokenScores) -> &Vec<f32>| {
        r.scores
            .iter()
            .flat_map(|s| f(s).iter().copied())
            .collect::<Vec<f32>>()
    };
    let ri_cuts: Vec<(f64, &str)> = sm
        .cutoffs
        .ri
        .as_ref()
        .map(|f| vec![(f.fence, "fence"), (f.q1, "Q1"), (f.q3, "Q3")])
        .unwrap_or_default();
    let tr_labels: Vec<String> = (1..=sm.cutoffs.tr_thresholds.len())
        .map(|i| format!("t{i}"))
        .collect();
    let tr_cuts: Vec<(f64, &str)> = sm
        .cutoffs
        .tr_thresholds
        .iter()
        .zip(&tr_labels)
        .map(|(&t, l)| (t, l.as_str()))
        .collect();
    let s_tr: Vec<f32> = r.mask.s_tr.iter().flatten().copied().collect();
    let mut h = histogram(
        "S_RI: attention received (flag: below the IQR fence)",
        &flat(&|s| &s.ri),
        &ri_cuts,
        true,
    );
    h += &histogram(
        "S_KN = 1 - p(correct token) (flag: below threshold)",
        &flat(&|s| &s.kn),
        &[(sm.cutoffs.kn_threshold, "threshold")],
        true,
    );
    h += &histogram(
        &format!(
            "S_TR (flag: Multi-Otsu class {} of {})",
            sm.tr_filter_class, sm.tr_classes
        ),
        &s_tr,
        &tr_cuts,
        false,
    );
    h
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}\
.big{font-size:16px}.note{background:#fff6d5;padding:6px 10px;border-left:4px solid #e6b800}\
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}figure{margin:0}\
figcaption{font-size:13px;margin-bottom:4px}.ax{font-size:10px;fill:#555}.cut{font-size:10px;fill:#c0392b}\
table.stats{border-collapse:collapse;font-size:13px}table.stats td,table.stats th{border:1px solid #ddd;padding:3px 8px;text-align:right}\
table.bars td{font-size:13px;padding:2px 6px}.bar{height:14px}\
.ex{font-family:ui-monospace,monospace;font-size:13px;line-height:1.9;border:1px solid #eee;padding:8px;margin:8px 0}\
.exh{font-family:system-ui;font-size:11px;color:#888}.prompt{color:#999}\
.t{border-radius:2px;padding:1px 0}.t.m{text-decoration:line-through;text-decoration-color:#c0392b}";
