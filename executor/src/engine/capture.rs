//! Capturing a child's output: stdout in full up to a cap, stderr passed through to the
//! executor's own stderr while only its tail is kept for the error message.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};

/// What was read from stdout.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Captured {
    /// Everything, up to end of file.
    Complete(Vec<u8>),
    /// More than the cap; the rest was not read.
    TooLarge,
}

/// Reads `reader` to its end, giving up as soon as it exceeds `cap` bytes.
pub(super) async fn read_capped(
    reader: impl AsyncRead + Unpin,
    cap: usize,
) -> std::io::Result<Captured> {
    let mut bytes = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    reader.take(limit).read_to_end(&mut bytes).await?;
    Ok(if bytes.len() > cap {
        Captured::TooLarge
    } else {
        Captured::Complete(bytes)
    })
}

/// Copies `reader` to this process's stderr as it arrives and returns the last `keep` bytes
/// as text. A read error ends the copy; what was read so far still counts.
pub(super) async fn tail_and_forward(reader: impl AsyncRead + Unpin, keep: usize) -> String {
    let tail = Arc::new(Mutex::new(Tail::new(keep)));
    forward_into(reader, Arc::clone(&tail)).await;
    tail.lock().map(|t| t.snapshot()).unwrap_or_default()
}

/// Copies `reader` to this process's stderr as it arrives, keeping its tail in `tail`
/// (which others may read meanwhile), until its end or a read error.
///
/// The copy writes to the standard stderr handle directly: each chunk is one locked write,
/// so it does not interleave mid-line with the executor's own log lines.
pub(super) async fn forward_into(mut reader: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buf = vec![0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let chunk = &buf[..n];
                // Losing the pass-through must not lose the result.
                let _ = std::io::stderr().write_all(chunk);
                if let Ok(mut tail) = tail.lock() {
                    tail.push(chunk);
                }
            }
        }
    }
}

/// The last `keep` bytes of a stream.
#[derive(Debug, Clone)]
pub(super) struct Tail {
    keep: usize,
    bytes: Vec<u8>,
    truncated: bool,
}

impl Tail {
    pub(super) fn new(keep: usize) -> Tail {
        Tail {
            keep,
            bytes: Vec::with_capacity(keep),
            truncated: false,
        }
    }

    pub(super) fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        // Trim only once twice the size has built up, so each byte is moved O(1) times.
        if self.bytes.len() > self.keep.saturating_mul(2).max(1) {
            self.trim();
        }
    }

    fn trim(&mut self) {
        if self.bytes.len() > self.keep {
            let excess = self.bytes.len() - self.keep;
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }

    /// The tail so far as text, leaving it to grow.
    pub(super) fn snapshot(&self) -> String {
        self.clone().text()
    }

    /// The tail as trimmed text (invalid UTF-8 replaced), with `…` when earlier output was
    /// dropped.
    pub(super) fn text(mut self) -> String {
        self.trim();
        let text = String::from_utf8_lossy(&self.bytes);
        let text = text.trim();
        if self.truncated {
            format!("…{}", text.trim_start_matches('\u{FFFD}'))
        } else {
            text.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_only_the_last_bytes() {
        let mut tail = Tail::new(4096);
        for i in 0..10_000 {
            tail.push(format!("line {i}\n").as_bytes());
        }
        let text = tail.text();
        assert!(text.starts_with('…'));
        assert!(text.ends_with("line 9999"));
        assert!(text.len() <= 4096 + '…'.len_utf8());
        assert!(!text.contains("line 1\n"));
    }

    #[test]
    fn a_short_stream_is_kept_whole() {
        let mut tail = Tail::new(4096);
        tail.push(b"  boom\n");
        assert_eq!(tail.text(), "boom");
    }

    #[test]
    fn a_tail_cut_inside_a_character_is_still_text() {
        let mut tail = Tail::new(3);
        tail.push("éé".as_bytes());
        assert_eq!(tail.text(), "…é");
    }

    #[tokio::test]
    async fn stdout_over_the_cap_is_too_large() {
        let data = [b'x'; 11];
        assert_eq!(
            read_capped(&data[..], 10).await.unwrap(),
            Captured::TooLarge
        );
        assert_eq!(
            read_capped(&data[..10], 10).await.unwrap(),
            Captured::Complete(vec![b'x'; 10])
        );
    }
}
