//! Fused CPU kernels with hand-written backward, as candle custom ops.
//!
//! Why: candle runs every elementwise op as its own pass with its own
//! allocation and pays a zero-filled gradient buffer plus an add pass for
//! every graph node in backward, so RMSNorm costs ~6 passes forward and more
//! backward, SwiGLU 4, the attention scale/mask/softmax 3 + the softmax's
//! own, a LoRA layer ~9 nodes, and the loss keeps a (N, V) log-prob tensor
//! alive for its backward. Each op here is one row-local pass forward and
//! one backward (rayon-parallel over rows, inner loops written to
//! auto-vectorise), and computes only the gradients that autograd can use
//! (an input that is neither a `Var` nor derived from one gets `None`).
//!
//! One file per op: [`norm`] (RMSNorm), [`swiglu`], [`attn_softmax`] (the
//! masked softmax and its in-kernel masks), [`attention`] (the whole
//! attention core), [`linear`] (LoRA and full fine-tuning's `x Wᵀ`),
//! [`quant`] (products with a block-format weight, a band at a time),
//! [`heads`] (head split + RoPE, head merge) and [`cross_entropy`]; shared
//! by them, [`numerics`] (compute types, vectorising exp, lane sums, the
//! AVX-512 / AVX2 dispatch) and [`cpu`] (contiguous storage slices, gemm
//! called directly, uninitialised outputs). Off the CPU every wrapper falls
//! back to [`composite`], the same maths as candle ops, which is also the
//! reference the tests compare against. Kernels take contiguous inputs; the
//! wrappers call `.contiguous()`.
//!
//! `unsafe` is confined to: writing outputs once into uninitialised buffers
//! (`cpu::try_build`, `build2`, `as_uninit`, `attention::assume_init`),
//! gemm's raw-pointer entry (`cpu::gemm_raw`; `quant::x_wt` writes column
//! bands through it), the attention core's
//! disjoint column-band writes from rayon tasks (`attention::SharedMut`),
//! and calling the `target_feature` copies of a kernel after run-time
//! detection (`numerics::multiversion!`). Each site says why it holds.

#[macro_use]
pub(crate) mod numerics;
#[macro_use]
pub(crate) mod cpu;
pub mod attention;
pub mod attn_softmax;
pub mod composite;
pub mod cross_entropy;
pub mod heads;
pub(crate) mod linear;
pub mod norm;
pub mod quant;
pub mod swiglu;

pub use attention::attention;
pub use attn_softmax::{attn_softmax, AttnMask};
pub use cross_entropy::{cross_entropy, cross_entropy_chunked, token_ce, CE_CHUNK};
pub use heads::{merge_heads, split_heads};
pub use norm::rms_norm;
pub use swiglu::swiglu;
