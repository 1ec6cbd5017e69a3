//! `tokenizer_config.json`: the special tokens by name, whether BOS/EOS are
//! added, and the chat template from `tokenizer.chat_template`.

use super::{GgufFile, Result};
use serde_json::{json, Map, Value};

impl GgufFile {
    /// `tokenizer_config.json` as the original model's: special token strings,
    /// whether BOS/EOS are added, and the chat template.
    ///
    /// `add_bos_token` follows `tokenizer.ggml.add_bos_token`; when absent it is
    /// true for SentencePiece vocabularies (llama.cpp's and transformers' default)
    /// and false for byte-level BPE (GPT-2 tokenizers add nothing). SmolLM2 names
    /// `<|im_start|>` as BOS but its file says `add_bos_token = false`, like its
    /// original tokenizer, whose chat template writes `<|im_start|>` itself.
    pub fn tokenizer_config(&self) -> Result<Value> {
        let tokens = self.tokens()?;
        let kind = self.opt_str("tokenizer.ggml.model")?.unwrap_or("");
        let name = |w: &str| -> Result<Value> {
            Ok(match self.special_id(w, tokens.len())? {
                Some(id) => json!(tokens[id as usize]),
                None => Value::Null,
            })
        };
        let add_bos = self
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(kind == "llama");
        let add_eos = self
            .opt_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        let mut c = Map::new();
        c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        c.insert("add_bos_token".into(), json!(add_bos));
        c.insert("add_eos_token".into(), json!(add_eos));
        c.insert("bos_token".into(), name("bos")?);
        c.insert("eos_token".into(), name("eos")?);
        c.insert("unk_token".into(), name("unknown")?);
        c.insert("pad_token".into(), name("padding")?);
        c.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(n) = self.opt_u64(&self.akey("context_length"))? {
            c.insert("model_max_length".into(), json!(n));
        }
        if let Some(t) = self.opt_str("tokenizer.chat_template")? {
            c.insert("chat_template".into(), json!(t));
        }
        Ok(Value::Object(c))
    }
}
