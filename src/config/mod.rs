//! The TOML config: the raw sections with their defaults ([`sections`]),
//! read into one [`Config`] that [`validate`] checks in a single pass,
//! reporting every problem at once, each naming the key and the file.
//! Code past [`Config::load`] only ever sees a validated config.
//!
//! Relative paths in a config are relative to the working directory (the
//! shipped configs are run from the repository root).

mod sections;
mod validate;

pub use sections::*;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub lora: LoraSection,
    pub output: OutputSection,
    /// Absent section = ordinary fine-tuning (the paper's "Normal").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xtf: Option<XtfSection>,
    /// Which tokens to train on: XTF, a baseline, or a file. Absent = XTF
    /// when `[xtf]` is enabled, otherwise every label token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<MaskSection>,
    /// Benchmarks run by `xtf-train eval` and after training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalSection>,
    /// Where the config was read from; used in error messages only.
    #[serde(skip)]
    pub source: PathBuf,
}

/// Parsed device spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal,
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Self::Cpu),
            "cuda" => Some(Self::Cuda(0)),
            "metal" => Some(Self::Metal),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda),
        }
    }

    pub fn device(self) -> candle_core::Result<candle_core::Device> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            Self::Cuda(n) => candle_core::Device::new_cuda(n),
            Self::Metal => candle_core::Device::new_metal(0),
        }
    }
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parse and validate TOML text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let de = toml::Deserializer::new(text);
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| format!(" (line {})", line_of(text, s.start)))
                .unwrap_or_default();
            Error::Config {
                file: path.to_path_buf(),
                key: if key == "." { "<root>".into() } else { key },
                msg: format!("{}{line}", inner.message().trim()),
            }
        })?;
        if cfg.xtf.as_ref().is_some_and(|x| x.preset != Preset::Paper) {
            cfg = cfg.with_preset(text, path)?;
        }
        cfg.source = path.to_path_buf();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Re-read `text` with `xtf.preset`'s defaults filled in under every
    /// `[xtf]` key the file leaves unset (the file already parsed once, so
    /// every key it sets is known to be valid).
    fn with_preset(&self, text: &str, path: &Path) -> Result<Self> {
        let preset = self.xtf.as_ref().map(|x| x.preset).unwrap_or_default();
        let err = |msg: String| Error::Config {
            file: path.to_path_buf(),
            key: "xtf.preset".into(),
            msg,
        };
        let mut root: toml::Table = text.parse().map_err(|e| err(format!("{e}")))?;
        let xtf = root
            .entry("xtf")
            .or_insert_with(|| toml::Table::new().into());
        for (key, value) in preset_defaults(preset) {
            let mut table = &mut *xtf;
            let mut parts = key.split('.').peekable();
            while let Some(part) = parts.next() {
                let toml::Value::Table(t) = table else { break };
                if parts.peek().is_none() {
                    t.entry(part).or_insert(value.clone());
                    break;
                }
                table = t.entry(part).or_insert_with(|| toml::Table::new().into());
            }
        }
        toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| err(e.message().to_string()))
    }

    fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::Config {
            file: self.source.clone(),
            key: key.into(),
            msg: msg.to_string(),
        }
    }

    fn xtf_section_enabled(&self) -> bool {
        self.xtf.as_ref().is_some_and(|x| x.enabled)
    }

    /// The mask strategy in force: `[mask] strategy`, else XTF when `[xtf]`
    /// is enabled (configs written before `[mask]` existed), else none.
    pub fn strategy(&self) -> Strategy {
        match &self.mask {
            Some(m) => m.strategy,
            None if self.xtf_section_enabled() => Strategy::Xtf,
            None => Strategy::None,
        }
    }

    /// Is XTF masking switched on?
    pub fn xtf_enabled(&self) -> bool {
        self.strategy() == Strategy::Xtf
    }

    /// The `[xtf]` settings, defaults filled in when the section is absent.
    pub fn xtf_settings(&self) -> XtfSection {
        self.xtf.clone().unwrap_or_default()
    }

    /// The device `model.device` names. With several ranks, `cuda` means
    /// the GPU of this rank's index within its node (`cuda:N` is taken as
    /// written).
    pub fn device(&self) -> Result<candle_core::Device> {
        let spec = DeviceSpec::parse(&self.model.device)
            .ok_or_else(|| self.err("model.device", "invalid device"))?;
        let w = crate::dist::world();
        let spec = match spec {
            DeviceSpec::Cuda(0) if self.model.device == "cuda" && w.size() > 1 => {
                DeviceSpec::Cuda(w.local_rank())
            }
            other => other,
        };
        spec.device().map_err(|e| {
            self.err(
                "model.device",
                format!("cannot open {}: {e}", self.model.device),
            )
        })
    }

    /// Resolved config as TOML, stored next to every output.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
}
