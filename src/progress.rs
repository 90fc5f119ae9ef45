//! Progress bars for long work, drawn on stderr only when it is a terminal.

use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use overlaybd::remote::registry::UploadProgress;

/// A byte-count bar for `total` bytes of work labelled `label`.
pub fn bytes(total: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// The hook that moves `bar` as an upload sends its bytes (a retried
/// upload session starts the bar again from 0).
pub fn upload_hook(bar: &ProgressBar) -> UploadProgress {
    let bar = bar.clone();
    Arc::new(move |sent| bar.set_position(sent))
}
