//! Chat templates from `tokenizer_config.json`, rendered with minijinja the
//! way transformers renders them with jinja2, and split into the prompt and
//! the response to train on.

use super::jinja::{raise_exception, strftime_now, tojson};
use super::rows::read_text;
use super::{FormatError, Message, Result};
use minijinja::value::{Serde, Value as JinjaValue};
use minijinja::Environment;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The named special tokens transformers passes to a chat template
/// (`tokenizer.special_tokens_map`).
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The template's name inside its minijinja environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A chat template from `tokenizer_config.json`, rendered with minijinja the
/// way transformers' `apply_chat_template(..., tokenize=False)` renders it
/// with jinja2: `trim_blocks` and `lstrip_blocks` on, `{% break %}` /
/// `{% continue %}`, `raise_exception(msg)`, `strftime_now(fmt)` (UTC here,
/// local time in transformers), a `tojson` that writes what Python's
/// `json.dumps` writes (no HTML escaping, `indent`, `separators`,
/// `sort_keys`, `ensure_ascii`), and Python string/dict/list methods
/// (`.strip()`, `.startswith()`, `.items()`, ...). Variables: `messages`,
/// `add_generation_prompt`, `tools` and `documents` (both none), the named
/// special tokens of the config (`bos_token`, `eos_token`, ...) and
/// `additional_special_tokens` when present. The `{% generation %}` tag
/// (assistant masks) is not supported.
pub struct ChatTemplate {
    name: String,
    env: Environment<'static>,
    tokens: BTreeMap<String, JinjaValue>,
    /// The text of the BOS the tokenizer rule prepends as an id.
    added_bos: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("added_bos", &self.added_bos)
            .finish_non_exhaustive()
    }
}

/// A special token in tokenizer_config.json: a string, or an AddedToken
/// object `{"content": "<s>", ...}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Build from a parsed `tokenizer_config.json`. `chat_template` is a
    /// string, or a list of `{name, template}` of which `default` is used.
    /// `Ok(None)` when the config has no chat template.
    pub fn from_tokenizer_config(v: &Value) -> Result<Option<Self>> {
        let source = match v.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => {
                let found = list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                match found
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                {
                    Some(s) => s.to_string(),
                    None => {
                        return Err(FormatError::Template {
                            name: "tokenizer_config.json".into(),
                            msg: "chat_template is a list without a `default` entry".into(),
                        })
                    }
                }
            }
            Some(_) => {
                return Err(FormatError::Template {
                    name: "tokenizer_config.json".into(),
                    msg: "chat_template must be a string or a list of {name, template}".into(),
                })
            }
        };
        let mut tokens = BTreeMap::new();
        for key in SPECIAL_TOKENS {
            if let Some(t) = v.get(key).and_then(token_text) {
                tokens.insert(key.to_string(), JinjaValue::from(t));
            }
        }
        if let Some(Value::Array(list)) = v.get("additional_special_tokens") {
            let list: Vec<JinjaValue> = list
                .iter()
                .filter_map(token_text)
                .map(JinjaValue::from)
                .collect();
            tokens.insert("additional_special_tokens".into(), JinjaValue::from(list));
        }
        Self::new(source, tokens, "tokenizer_config.json").map(Some)
    }

    /// Read a `tokenizer_config.json` (see [`Self::from_tokenizer_config`]);
    /// errors name the file. When the config has no template but a
    /// `chat_template.jinja` sits beside it (where newer transformers save
    /// it), that file is the template.
    pub fn from_file(path: &Path) -> Result<Option<Self>> {
        let text = read_text(path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| FormatError::file(path, e.line(), format!("invalid JSON: {e}")))?;
        let name = path.display().to_string();
        if let Some(t) = Self::from_tokenizer_config(&v).map_err(|e| rename(e, &name))? {
            return Ok(Some(t.with_name(name)));
        }
        let jinja = path.with_file_name("chat_template.jinja");
        if !jinja.is_file() {
            return Ok(None);
        }
        let mut v = v;
        if let Value::Object(o) = &mut v {
            o.insert("chat_template".into(), Value::String(read_text(&jinja)?));
        }
        let name = jinja.display().to_string();
        Self::from_tokenizer_config(&v)
            .map_err(|e| rename(e, &name))
            .map(|t| t.map(|t| t.with_name(name)))
    }

    /// Name the template in error messages (e.g. by its file).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Tell the template which BOS the tokenizer rule prepends as an id
    /// (spec "BOS"; `Tok::bos_text`), `None` when it prepends none. Prompts
    /// starting with exactly that text lose it, so BOS is not there twice
    /// (Llama 3, Mistral); a template's leading special token that the
    /// tokenizer does not add stays in the text (SmolLM2 names
    /// `<|im_start|>` its `bos_token` and never adds it). Without this call
    /// nothing is stripped.
    pub fn with_added_bos(mut self, bos_text: Option<String>) -> Self {
        self.added_bos = bos_text;
        self
    }

    /// The name errors use.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn new(source: String, tokens: BTreeMap<String, JinjaValue>, name: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| template_err(name, e))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| template_err(name, e))?;
        Ok(ChatTemplate {
            name: name.to_string(),
            env,
            tokens,
            added_bos: None,
        })
    }

    /// Render a chat, with the assistant header appended when
    /// `add_generation_prompt` (if the template supports it).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = self.tokens.clone();
        ctx.insert("messages".into(), JinjaValue::from(Serde(messages)));
        ctx.insert(
            "add_generation_prompt".into(),
            JinjaValue::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), JinjaValue::from(()));
        ctx.insert("documents".into(), JinjaValue::from(()));
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_err(&self.name, e))?;
        tmpl.render(JinjaValue::from(ctx))
            .map_err(|e| template_err(&self.name, e))
    }

    /// Split a chat into the prompt and the response to train on.
    ///
    /// The prompt is the rendering of every message before the LAST
    /// assistant message with `add_generation_prompt = true`; the response is
    /// the rest of the rendering of the chat up to and including that
    /// message (later messages are dropped), which must start with the
    /// prompt: templates that move text between turns (Mistral v0.3 puts the
    /// system message into the last user turn) fail with an error naming the
    /// template. The response therefore ends with the template's end-of-turn
    /// text (`<|im_end|>\n`, `<|eot_id|>`, `</s>`), so callers should not
    /// append EOS again.
    ///
    /// The prompt loses a leading [`Self::with_added_bos`] text, so that
    /// `[BOS] + tok(prompt) + tok(response)` are the full rendering's tokens.
    pub fn split_prompt_response(&self, messages: &[Message]) -> Result<(String, String)> {
        let last = messages
            .iter()
            .rposition(|m| m.role == "assistant")
            .ok_or_else(|| {
                template_err(&self.name, "the chat has no assistant message to train on")
            })?;
        let prompt = self.render(&messages[..last], true)?;
        let full = self.render(&messages[..=last], false)?;
        let Some(response) = full.strip_prefix(&prompt) else {
            return Err(template_err(
                &self.name,
                "the rendered chat does not start with the rendered prompt (messages before the last \
                 assistant turn, with add_generation_prompt), so it cannot be split into prompt and response",
            ));
        };
        Ok((
            self.strip_added_bos(&prompt).to_string(),
            response.to_string(),
        ))
    }

    /// A prompt for generation: the chat rendered with the assistant header
    /// appended, less the leading [`Self::with_added_bos`] text.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<String> {
        let text = self.render(messages, true)?;
        Ok(self.strip_added_bos(&text).to_string())
    }

    fn strip_added_bos<'a>(&self, text: &'a str) -> &'a str {
        match self.added_bos.as_deref() {
            Some(bos) if !bos.is_empty() => text.strip_prefix(bos).unwrap_or(text),
            _ => text,
        }
    }
}

fn template_err(name: &str, e: impl std::fmt::Display) -> FormatError {
    FormatError::Template {
        name: name.to_string(),
        msg: e.to_string(),
    }
}

fn rename(e: FormatError, name: &str) -> FormatError {
    match e {
        FormatError::Template { msg, .. } => FormatError::Template {
            name: name.to_string(),
            msg,
        },
        other => other,
    }
}
