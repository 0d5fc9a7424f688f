//! Progress for long operations: a bar on stderr when stderr is a terminal
//! and the work is large; nothing at all when piped or small, so scripts and
//! logs see only the result.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Items (pages, BFNs) below which no bar is shown: such work ends before a
/// bar would be read.
pub const THRESHOLD: u64 = 8192;

/// A bar for `len` items of `what`, hidden unless stderr is a terminal and
/// `len` reaches [`THRESHOLD`].
pub fn bar(len: u64, what: &str) -> ProgressBar {
    if len < THRESHOLD || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let template = format!("{what} [{{bar:40}}] {{pos}}/{{len}} ({{eta}} left)");
    bar.set_style(
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
