//! `hf://owner/name[/config][/split]` sources: parsed, then resolved to the
//! split's files in hf-hub's cache (offline when `HF_HUB_OFFLINE=1`).

use super::{FormatError, Result};
use std::path::PathBuf;

/// Where data comes from: a local `.jsonl` / `.json` / `.parquet` file, or a
/// Hub dataset `hf://owner/name[/config][/split]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    Local(PathBuf),
    Hub {
        repo: String,
        config: Option<String>,
        split: String,
    },
}

/// The split read when an `hf://` source names none.
pub const DEFAULT_SPLIT: &str = "train";

/// Parse a data source.
///
/// `hf://owner/name` reads split `train`; `hf://owner/name/split` names the
/// split; `hf://owner/name/config/split` names both. One extra segment is
/// always the split (a config alone would be ambiguous), so a dataset with
/// several configs is written with both, e.g. `hf://openai/gsm8k/main/test`.
/// Anything else is a local path.
pub fn parse_source(s: &str) -> Result<DataSource> {
    let err = |msg: &str| FormatError::Source {
        source_str: s.to_string(),
        msg: msg.to_string(),
    };
    let Some(rest) = s.strip_prefix("hf://") else {
        if s.trim().is_empty() {
            return Err(err("empty path"));
        }
        return Ok(DataSource::Local(PathBuf::from(s)));
    };
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    if parts.iter().any(|p| p.is_empty()) || parts.len() < 2 {
        return Err(err("expected hf://owner/name[/config][/split]"));
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let (config, split) = match &parts[2..] {
        [] => (None, DEFAULT_SPLIT),
        [split] => (None, *split),
        [config, split] => (Some(config.to_string()), *split),
        _ => {
            return Err(err(
                "too many segments; expected hf://owner/name[/config][/split]",
            ))
        }
    };
    Ok(DataSource::Hub {
        repo,
        config,
        split: split.to_string(),
    })
}

/// Resolve a Hub dataset to local files through hf-hub's cache.
///
/// The file listing comes from the Hub API (`/api/datasets/{repo}`) and
/// [`select_split_files`] picks the split's files; each is then fetched into
/// the cache (or found there). With `HF_HUB_OFFLINE=1` nothing touches the
/// network: the listing is the cached snapshot of the `main` revision and a
/// dataset not in the cache is an error. `HF_HOME` moves the cache, as for
/// models. Only parquet / JSONL / JSON data files are considered, so script
/// datasets without data files fail with a message saying so.
pub fn resolve_hub(repo: &str, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>> {
    let hub_repo = hf_hub::Repo::new(repo.to_string(), hf_hub::RepoType::Dataset);
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if offline {
        let cache = hf_hub::Cache::from_env();
        let files = cached_listing(&cache, &hub_repo).ok_or_else(|| {
            FormatError::hub(repo, "not in the local hub cache (HF_HUB_OFFLINE is set)")
        })?;
        let chosen =
            select_split_files(&files, config, split).map_err(|m| FormatError::hub(repo, m))?;
        let cached = cache.repo(hub_repo);
        return chosen
            .iter()
            .map(|f| {
                cached.get(f).ok_or_else(|| {
                    FormatError::hub(repo, format!("{f} is not in the local hub cache"))
                })
            })
            .collect();
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| FormatError::hub(repo, e))?;
    let api_repo = api.repo(hub_repo);
    let info = api_repo
        .info()
        .map_err(|e| FormatError::hub(repo, format!("cannot list files: {e}")))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let chosen =
        select_split_files(&files, config, split).map_err(|m| FormatError::hub(repo, m))?;
    chosen
        .iter()
        .map(|f| {
            api_repo
                .get(f)
                .map_err(|e| FormatError::hub(repo, format!("download of {f} failed: {e}")))
        })
        .collect()
}

/// Every file of the cached snapshot that `refs/main` points at, as paths
/// relative to the snapshot with `/` separators; `None` when not cached.
fn cached_listing(cache: &hf_hub::Cache, repo: &hf_hub::Repo) -> Option<Vec<String>> {
    let dir = cache.path().join(repo.folder_name());
    let sha = std::fs::read_to_string(dir.join("refs").join(repo.revision())).ok()?;
    let root = dir.join("snapshots").join(sha.trim());
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(&root) {
                let parts: Vec<_> = rel.iter().map(|c| c.to_string_lossy()).collect();
                out.push(parts.join("/"));
            }
        }
    }
    out.sort();
    Some(out)
}

/// A data file's place in a Hub dataset repo: its config directory (if any)
/// and the split it holds.
struct HubFile<'a> {
    path: &'a str,
    config: Option<&'a str>,
    split_name: &'a str,
}

/// Classify a repo path; `None` for files that are not data files.
///
/// The split is the file name up to its first `-` or extension
/// (`train-00000-of-00001.parquet` → `train`, `test.jsonl` → `test`), or the
/// directory holding the file when the name is a bare shard number
/// (`default/train/0000.parquet`, the layout of the Hub's parquet
/// conversions). The config is the first directory left after dropping a
/// leading `data/` and the split directory.
fn classify(path: &str) -> Option<HubFile<'_>> {
    let mut dirs: Vec<&str> = path.split('/').collect();
    let name = dirs.pop()?;
    let stem = [".parquet", ".jsonl", ".ndjson", ".json"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))?;
    let head = stem.split('-').next().unwrap_or(stem);
    let shard_only = head == "partial" || head.chars().all(|c| c.is_ascii_digit());
    let split_name = match dirs.last() {
        Some(&dir) if shard_only => {
            dirs.pop();
            dir
        }
        _ => head,
    };
    if dirs.first() == Some(&"data") {
        dirs.remove(0);
    }
    Some(HubFile {
        path,
        config: dirs.first().copied(),
        split_name,
    })
}

/// Pick the files of `split` (and `config`) from a dataset repo's listing.
///
/// The rule, covering the layouts the Hub's datasets use:
///
/// - only `.parquet`, `.jsonl`, `.ndjson` and `.json` files count;
/// - a file belongs to split `S` when its name is `S.<ext>` or starts with
///   `S-` (`train-00000-of-00005.parquet`), or when it is a bare shard
///   number in a directory named `S` (`default/train/0000.parquet`, the
///   Hub's parquet conversions). `train` therefore does not
///   match `train_sft-*.parquet`;
/// - its config is its first directory, after dropping a leading `data/` and
///   the split directory: `main/train-*.parquet` is config `main`,
///   `data/train-*.parquet` and `test.jsonl` have none;
/// - with `config` given, files of that config are chosen (`default` also
///   matches files with none); without it, files with no config are chosen,
///   else the files of the only config present; several configs is an error
///   that lists them.
///
/// The result is sorted, so shards come in order. An error message (without
/// the repo name) lists the available splits/configs when nothing matches.
pub fn select_split_files(
    files: &[String],
    config: Option<&str>,
    split: &str,
) -> std::result::Result<Vec<String>, String> {
    let data: Vec<HubFile> = files.iter().filter_map(|f| classify(f)).collect();
    if data.is_empty() {
        return Err("no .parquet/.jsonl/.json data files in the repo (script-only datasets are not supported)".into());
    }
    let in_split: Vec<&HubFile> = data.iter().filter(|f| f.split_name == split).collect();
    let configs: Vec<&str> = {
        let mut c: Vec<&str> = in_split.iter().filter_map(|f| f.config).collect();
        c.sort();
        c.dedup();
        c
    };
    let chosen: Vec<&HubFile> = match config {
        Some(cfg) => in_split
            .iter()
            .copied()
            .filter(|f| f.config == Some(cfg) || (cfg == "default" && f.config.is_none()))
            .collect(),
        None => {
            let plain: Vec<&HubFile> = in_split
                .iter()
                .copied()
                .filter(|f| f.config.is_none())
                .collect();
            if !plain.is_empty() {
                plain
            } else if configs.len() > 1 {
                return Err(format!(
                    "split `{split}` exists in several configs ({}); name one as hf://owner/name/CONFIG/{split}",
                    configs.join(", ")
                ));
            } else {
                in_split
            }
        }
    };
    if chosen.is_empty() {
        let mut splits: Vec<&str> = data.iter().map(|f| f.split_name).collect();
        splits.sort();
        splits.dedup();
        let mut all_configs: Vec<&str> = data.iter().filter_map(|f| f.config).collect();
        all_configs.sort();
        all_configs.dedup();
        return Err(format!(
            "no data files for config {} split `{split}` (splits seen: {}; configs seen: {})",
            config.map_or("(none)".to_string(), |c| format!("`{c}`")),
            splits.join(", "),
            if all_configs.is_empty() {
                "none".to_string()
            } else {
                all_configs.join(", ")
            },
        ));
    }
    let mut out: Vec<String> = chosen.iter().map(|f| f.path.to_string()).collect();
    out.sort();
    Ok(out)
}
