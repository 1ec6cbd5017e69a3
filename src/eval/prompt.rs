//! A problem's prompt as the model was trained to see it.

use super::*;

/// Renders a problem's prompt text as the model was trained to see it.
pub struct Prompter {
    chat: Option<ChatTemplate>,
    system: Option<String>,
    template: String,
}

impl Prompter {
    pub(super) fn new(cfg: &Config, task: &EvalTask, tok: &Tok, model_dir: &Path) -> Result<Self> {
        let template = match (&task.template, task.name) {
            (Some(t), _) => t.clone(),
            (None, TaskKind::HumanEval) => "{prompt}".into(),
            (None, _) => cfg.data.template.clone(),
        };
        Self::with_template(cfg, template, tok, model_dir)
    }

    /// The prompter of training's own format (`data.template` or the chat
    /// template): what `xtf-train generate` wraps its prompt in.
    pub fn for_data(cfg: &Config, tok: &Tok, model_dir: &Path) -> Result<Self> {
        Self::with_template(cfg, cfg.data.template.clone(), tok, model_dir)
    }

    fn with_template(cfg: &Config, template: String, tok: &Tok, model_dir: &Path) -> Result<Self> {
        let d = &cfg.data;
        let chat = if d.chat_template {
            let tc = model_dir.join("tokenizer_config.json");
            let t = ChatTemplate::from_file(&tc)?;
            let t = t.ok_or_else(|| Error::Config {
                file: cfg.source.clone(),
                key: "data.chat_template".into(),
                msg: format!("{} has no chat_template", tc.display()),
            })?;
            // BOS is added as an id (the tokenisation contract), so a
            // template that writes the added BOS's text loses it.
            Some(t.with_added_bos(tok.bos_text()))
        } else {
            None
        };
        Ok(Self {
            chat,
            system: d.system.clone(),
            template,
        })
    }

    /// The text to tokenise (after the BOS id, if the tokenizer adds one).
    pub fn render(&self, prompt: &str) -> Result<String> {
        let Some(chat) = &self.chat else {
            return Ok(self.template.replace("{prompt}", prompt));
        };
        let m = crate::data::user_chat(self.system.as_deref(), prompt.to_string(), None);
        Ok(chat.render_prompt(&m)?)
    }
}
