//! Graceful stop: SIGTERM (a scheduler's time limit) or SIGINT (Ctrl-C) asks
//! the run to finish its current optimizer step, write a checkpoint and exit
//! non-zero with a line saying how to `--resume`; a second signal stops the
//! process at once. The binary installs the handlers ([`install`]); the
//! training loop and the scoring pass poll [`requested`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

fn flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Has a stop been asked for?
pub fn requested() -> bool {
    flag().load(Ordering::Relaxed)
}

/// Ask for a stop, as the first signal does (tests, embedding callers).
pub fn request() {
    flag().store(true, Ordering::Relaxed);
}

/// Install the handlers: the first SIGTERM / SIGINT sets the flag, a second
/// one exits at once (status 128 + signal), through signal-hook's
/// conditional shutdown.
pub fn install() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for (sig, status) in [(SIGTERM, 143), (SIGINT, 130)] {
        // Registered first, so it sees the flag as it was before this signal.
        signal_hook::flag::register_conditional_shutdown(sig, status, Arc::clone(flag()))?;
        signal_hook::flag::register(sig, Arc::clone(flag()))?;
    }
    Ok(())
}
