//! The RI fence and TR Multi-Otsu cut-offs against numpy / scikit-image.
//!
//! Golden numbers come from `scripts/make_filter_fixtures.py`
//! (`tests/fixtures/filter/*.json`: numpy.quantile and
//! skimage.filters.threshold_multiotsu on the saved float32 inputs); the
//! small cases below are computed by hand.

use serde_json::Value;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use xtf_train::xtf::filter::*;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const NBINS: usize = 256;

struct Fixture {
    name: String,
    json: Value,
    values: Vec<f32>,
}

/// Fixture numbers are strings (shortest repr), parsed by std so that they
/// round once, straight to the target type: serde_json's number parser can
/// be 1 ulp off on 17-digit floats.
fn num<T: FromStr>(v: &Value) -> Result<T>
where
    T::Err: Error + 'static,
{
    let s = v
        .as_str()
        .ok_or_else(|| format!("expected a number string, got {v}"))?;
    Ok(s.parse()?)
}

fn nums<T: FromStr>(v: &Value) -> Result<Vec<T>>
where
    T::Err: Error + 'static,
{
    v.as_array()
        .ok_or_else(|| format!("expected an array, got {v}"))?
        .iter()
        .map(num)
        .collect()
}

fn fixtures() -> Result<Vec<Fixture>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/filter");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("failed to list {}: {e}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "json"));
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| format!("failed to parse {}: {e}", path.display()))?;
        let values = nums(&json["values"])?;
        let name = json["name"].as_str().ok_or("name missing")?.to_string();
        out.push(Fixture { name, json, values });
    }
    // the generator writes 21 cases; a missing directory must not pass silently
    assert!(
        out.len() >= 21,
        "only {} filter fixtures in {}",
        out.len(),
        dir.display()
    );
    Ok(out)
}

#[test]
fn quantiles_equal_numpy_linear_on_every_fixture() -> Result<()> {
    for f in fixtures()? {
        for (key, q) in [("0.25", 0.25), ("0.5", 0.5), ("0.75", 0.75)] {
            let want: f64 = num(&f.json["quantiles"][key])?;
            let got = quantile_linear(&f.values, q).ok_or("no quantile")?;
            assert_eq!(got, want, "{}: quantile {q}", f.name);
        }
    }
    Ok(())
}

#[test]
fn iqr_fence_uses_numpy_quartiles_on_every_fixture() -> Result<()> {
    for f in fixtures()? {
        let q1: f64 = num(&f.json["quantiles"]["0.25"])?;
        let q3: f64 = num(&f.json["quantiles"]["0.75"])?;
        for factor in [1.0, 0.25] {
            let got = iqr_fence(&f.values, factor).ok_or("no fence")?;
            assert_eq!(
                got,
                IqrFence {
                    q1,
                    q3,
                    fence: q1 - factor * (q3 - q1)
                },
                "{}",
                f.name
            );
        }
    }
    Ok(())
}

/// The error skimage raised, as the variant this crate must return.
fn expected_error(message: &str, values: &[f32], classes: usize) -> Result<MultiOtsuError> {
    if let Some(rest) =
        message.strip_prefix("After discretization into bins, the input image has only ")
    {
        let nonempty = rest.split(' ').next().ok_or("no count")?.parse()?;
        return Ok(MultiOtsuError::TooFewBins { nonempty, classes });
    }
    if message.starts_with("Too many bins for data range") {
        let min = values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        return Ok(MultiOtsuError::RangeTooNarrow {
            min,
            max,
            nbins: NBINS,
        });
    }
    Err(format!("unexpected skimage error: {message}").into())
}

#[test]
fn multiotsu_matches_skimage_on_every_fixture() -> Result<()> {
    let mut compared = 0;
    for f in fixtures()? {
        for classes in [2, 3, 4] {
            let want = &f.json["multiotsu"][classes.to_string()];
            let got = threshold_multiotsu(&f.values, classes, NBINS);
            let ctx = format!("{} classes={classes}", f.name);
            if let Some(message) = want["error"].as_str() {
                assert_eq!(
                    got,
                    Err(expected_error(message, &f.values, classes)?),
                    "{ctx}"
                );
                continue;
            }
            let want: Vec<f64> = nums::<f32>(want)?.into_iter().map(f64::from).collect();
            let got = got.map_err(|e| format!("{ctx}: {e}"))?;
            // Thresholds are float32 bin centres, so a faithful port gives the
            // same bits; a relative tolerance (even 1e-6) would hide 1-ulp
            // edge errors, e.g. edges computed in f64.
            assert_eq!(got, want, "{ctx}");
            compared += 1;
        }
    }
    assert!(compared >= 40, "only {compared} threshold sets compared");
    Ok(())
}

/// Guards the fixture set itself: some cases must separate skimage from a
/// textbook float64 Multi-Otsu, or the test above would not catch a
/// re-derivation.
#[test]
fn fixtures_include_cases_where_textbook_otsu_disagrees() -> Result<()> {
    let disagreeing = fixtures()?
        .iter()
        .filter(|f| {
            f.json["textbook_differs"]
                .as_object()
                .is_some_and(|m| m.values().any(|v| v == true))
        })
        .count();
    assert!(
        disagreeing >= 2,
        "only {disagreeing} fixtures where textbook Otsu differs"
    );
    Ok(())
}

#[test]
fn quantiles_of_one_to_four_by_hand() {
    // numpy.quantile([1, 2, 3, 4], [0.25, 0.5, 0.75]) = [1.75, 2.5, 3.25]
    let v = [4.0, 1.0, 3.0, 2.0];
    assert_eq!(quantile_linear(&v, 0.25), Some(1.75));
    assert_eq!(quantile_linear(&v, 0.5), Some(2.5));
    assert_eq!(quantile_linear(&v, 0.75), Some(3.25));
    assert_eq!(quantile_linear(&v, 0.0), Some(1.0));
    assert_eq!(quantile_linear(&v, 1.0), Some(4.0));
    // virtual index 3 * 0.9 = 2.7: 4 - (4 - 3) * 0.3, numpy's upper-side lerp
    assert_eq!(quantile_linear(&v, 0.9), Some(4.0 - 0.30000000000000004));
}

#[test]
fn quantile_uses_numpys_upper_side_lerp() {
    // np.quantile(np.float32([0.7, 0.2]).astype(np.float64), 0.9)
    //   = 0.6499999895691871 (b - (b - a) * (1 - t)); the one-sided
    //   a + (b - a) * t gives 0.6499999895691873
    assert_eq!(quantile_linear(&[0.7, 0.2], 0.9), Some(0.6499999895691871));
    // np.quantile(np.float32([0.2, 0.7]).astype(np.float64), 0.6) = 0.49999999403953554
    assert_eq!(quantile_linear(&[0.2, 0.7], 0.6), Some(0.49999999403953554));
}

#[test]
fn quantile_of_nothing_or_out_of_range_q_is_none() {
    assert_eq!(quantile_linear(&[], 0.5), None);
    assert_eq!(quantile_linear(&[1.0], -0.1), None);
    assert_eq!(quantile_linear(&[1.0], 1.5), None);
    assert_eq!(quantile_linear(&[1.0], f64::NAN), None);
    assert_eq!(quantile_linear(&[7.5], 0.3), Some(7.5));
    assert_eq!(iqr_fence(&[], 1.0), None);
}

#[test]
fn iqr_fence_of_one_to_four_by_hand() {
    // Q1 = 1.75, Q3 = 3.25, IQR = 1.5
    let f = iqr_fence(&[1.0, 2.0, 3.0, 4.0], 1.0);
    assert_eq!(
        f,
        Some(IqrFence {
            q1: 1.75,
            q3: 3.25,
            fence: 0.25
        })
    );
    let f = iqr_fence(&[1.0, 2.0, 3.0, 4.0], 0.5);
    assert_eq!(f.map(|f| f.fence), Some(1.0));
}

#[test]
fn fewer_distinct_values_than_classes_flags_nothing() {
    let two = [0.2f32, 0.8, 0.2, 0.8, 0.8];
    for classes in [3, 4] {
        assert_eq!(
            threshold_multiotsu(&two, classes, NBINS),
            Err(MultiOtsuError::TooFewBins {
                nonempty: 2,
                classes
            })
        );
    }
    // all equal: numpy widens the range to [x - 0.5, x + 0.5], one bin is hit
    assert_eq!(
        threshold_multiotsu(&[0.37; 9], 2, NBINS),
        Err(MultiOtsuError::TooFewBins {
            nonempty: 1,
            classes: 2
        })
    );
    // distinct values that share a bin count once
    assert_eq!(
        threshold_multiotsu(&[0.0, 0.001, 1.0], 3, NBINS),
        Err(MultiOtsuError::TooFewBins {
            nonempty: 2,
            classes: 3
        })
    );
    let msg = MultiOtsuError::TooFewBins {
        nonempty: 2,
        classes: 3,
    }
    .to_string();
    assert!(msg.contains('2') && msg.contains('3'), "{msg}");
}

#[test]
fn exactly_k_nonempty_bins_returns_their_centres() -> Result<()> {
    // edges over [0, 1] are i/256 exactly; bins 0 and 128 are hit, centres
    // 0.5/256 and 128.5/256
    let t = threshold_multiotsu(&[0.0, 0.5, 1.0, 0.5], 3, NBINS)?;
    assert_eq!(t, vec![0.001953125, 0.501953125]);
    Ok(())
}

#[test]
fn invalid_input_gives_typed_errors() {
    assert_eq!(
        threshold_multiotsu(&[], 3, NBINS),
        Err(MultiOtsuError::Empty)
    );
    assert_eq!(
        threshold_multiotsu(&[0.0, 1.0], 1, NBINS),
        Err(MultiOtsuError::InvalidClasses { classes: 1 })
    );
    assert_eq!(
        threshold_multiotsu(&[0.0, 1.0], 2, 0),
        Err(MultiOtsuError::ZeroBins)
    );
    assert_eq!(
        threshold_multiotsu(&[0.0, f32::NAN, 1.0], 2, NBINS),
        Err(MultiOtsuError::NonFinite)
    );
    assert_eq!(
        threshold_multiotsu(&[0.0, f32::INFINITY], 2, NBINS),
        Err(MultiOtsuError::NonFinite)
    );
    assert_eq!(
        threshold_multiotsu(&[1e8; 4], 2, NBINS),
        Err(MultiOtsuError::RangeTooNarrow {
            min: 1e8,
            max: 1e8,
            nbins: NBINS
        })
    );
}

#[test]
fn otsu_class_puts_a_score_on_a_threshold_in_the_upper_class() {
    let t = [0.25, 0.5];
    assert_eq!(otsu_class(f32::NEG_INFINITY, &t), 0);
    assert_eq!(otsu_class(0.2499, &t), 0);
    assert_eq!(otsu_class(0.25, &t), 1);
    assert_eq!(otsu_class(0.4999, &t), 1);
    assert_eq!(otsu_class(0.5, &t), 2);
    assert_eq!(otsu_class(1.0, &t), 2);
    assert_eq!(otsu_class(0.7, &[]), 0);
    // thresholds are float32 bin centres: a score equal to one is above it
    let centre = f64::from(0.3015625f32);
    assert_eq!(otsu_class(0.3015625, &[0.1, centre, 0.6]), 2);
}

/// skimage's shortcut for exactly K non-empty bins thresholds at bin
/// centres, so a level in the upper half of its bin lands one class up and
/// the class below it stays empty. This is the reference behaviour.
#[test]
fn shortcut_threshold_can_put_a_level_in_the_class_above() -> Result<()> {
    let levels = [0.0f32, 0.4995, 1.0];
    let t = threshold_multiotsu(&levels, 3, NBINS)?;
    let classes: Vec<usize> = levels.iter().map(|&s| otsu_class(s, &t)).collect();
    assert_eq!(classes, vec![0, 2, 2]);
    Ok(())
}

/// Spec "Per-example caps": at most floor(n · max_share) of the flagged
/// tokens stay flagged, the lowest-scoring ones, ties to the earlier position.
#[test]
fn per_example_cap_by_hand() {
    let scores = [0.5f32, 0.1, 0.3, 0.1, 0.9, 0.2, 0.4, 0.8, 0.7, 0.6];
    let rule = [
        true, true, false, true, false, true, true, false, true, false,
    ];
    let capped = |share: Option<f64>| {
        let mut f = rule;
        cap_flags(&mut f, &scores, share);
        f.iter()
            .enumerate()
            .filter(|(_, &b)| b)
            .map(|(k, _)| k)
            .collect::<Vec<_>>()
    };
    // No cap: the rule's flags as they are.
    assert_eq!(capped(None), vec![0, 1, 3, 5, 6, 8]);
    // floor(10 · 0.3) = 3: positions 1 and 3 tie at 0.1 (both kept), then 5 (0.2).
    assert_eq!(capped(Some(0.3)), vec![1, 3, 5]);
    // floor(10 · 0.1) = 1: of the tie at 0.1 the earlier position wins.
    assert_eq!(capped(Some(0.1)), vec![1]);
    // floor(10 · 0.05) = 0: nothing flagged in this example.
    assert_eq!(capped(Some(0.05)), Vec::<usize>::new());
    // A cap above the rule's count changes nothing.
    assert_eq!(capped(Some(0.9)), vec![0, 1, 3, 5, 6, 8]);
    assert_eq!(capped(Some(1.0)), vec![0, 1, 3, 5, 6, 8]);
    // floor(100 · 0.29) is 29, although 100.0 * 0.29 = 28.999999999999996.
    let mut f = [true; 100];
    let s: Vec<f32> = (0..100).map(|k| k as f32).collect();
    cap_flags(&mut f, &s, Some(0.29));
    assert_eq!(f.iter().filter(|&&b| b).count(), 29);
    assert!(f[..29].iter().all(|&b| b));
}
