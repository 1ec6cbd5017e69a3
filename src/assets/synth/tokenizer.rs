//! A byte-level BPE trained on the synthetic corpus.

use super::{SynthError, MIN_VOCAB_SIZE, SPECIAL_TOKENS};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

/// Train a byte-level BPE tokenizer on `texts`.
///
/// The full 256-byte alphabet is always in the vocabulary, so any text (noise,
/// prompts in a template the corpus never saw) encodes without an unknown
/// token and `decode(encode(x)) == x`. No normaliser and no prefix space keep
/// that round trip exact. The post-processor is `ByteLevel` only (offset
/// trimming), never a template: the trainer adds BOS/EOS itself. Training is
/// deterministic: merges are chosen by count with ties broken by token id, and
/// the initial alphabet is sorted, so no hash order leaks into the result.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<Tokenizer, SynthError> {
    if vocab_size < MIN_VOCAB_SIZE {
        return Err(SynthError::VocabTooSmall { vocab_size });
    }
    if texts.iter().all(|t| t.is_empty()) {
        return Err(SynthError::EmptyCorpus);
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level))
            .build()
            .map_err(SynthError::Tokenizer)?;
    tok.train(&mut trainer, texts.iter())
        .map_err(SynthError::Tokenizer)?;
    Ok(Tokenizer::from(tok))
}
