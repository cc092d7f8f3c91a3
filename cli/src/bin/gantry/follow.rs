//! `submit --stream`: the answer's pieces printed as they come, with a note on stderr when
//! pieces were lost or a retry starts over, until the task has ended.

use std::io::Write;

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use gantry_producer::{Attempt, Progress, StreamEvent, TaskRecord, TaskStream};

/// Prints the pieces of `stream` as they arrive, on stdout (on stderr with `json`, so stdout
/// stays one JSON object), and returns the task once it has ended. The pieces end with a
/// newline, unless the last one ended a line itself.
///
/// # Errors
/// The stream's error (a wait that timed out, Postgres lost), or a write to a closed output.
pub(crate) async fn follow(mut stream: TaskStream, json: bool) -> Result<TaskRecord> {
    let mut text: Box<dyn Write> = if json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let mut order = Order::default();
    // Whether a piece was printed since the last newline: a note or the end starts a line.
    let mut line_open = false;
    let record = loop {
        let event = stream.try_next().await?;
        let note = match event {
            Some(StreamEvent::Progress(piece)) => {
                let step = order.observe(&piece);
                if step.prints() {
                    text.write_all(piece.delta.as_bytes())
                        .and_then(|()| text.flush())
                        .context("writing the answer's pieces")?;
                    if !piece.delta.is_empty() {
                        line_open = !piece.delta.ends_with('\n');
                    }
                }
                step.note(&piece)
            }
            Some(StreamEvent::ProgressLost { reason }) => Some(format!(
                "no more pieces will come ({reason}); waiting for the result, which is whole"
            )),
            Some(StreamEvent::Finished(record)) => break *record,
            None => anyhow::bail!(
                "the stream of task {} ended before the task did; follow it with `gantry wait {}`",
                stream.task_id(),
                stream.task_id()
            ),
        };
        if let Some(note) = note {
            // On a line of its own, also where the pieces and notes share a terminal.
            let start = if line_open { "\n" } else { "" };
            eprintln!("{start}note: {note}");
        }
    };
    if line_open {
        writeln!(text).context("writing the answer's pieces")?;
    }
    Ok(record)
}

/// Where the pieces seen so far leave off: the attempt they belong to, and the sequence
/// number expected next.
#[derive(Debug, Default)]
struct Order {
    attempt: Option<Attempt>,
    next: u64,
}

/// What a piece means for the text printed so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The piece that was expected.
    InOrder,
    /// The first piece of a later attempt: the text so far was a failed attempt's.
    StartsOver { previous: Attempt },
    /// Pieces `from..piece.seq` never came.
    Gap { from: u64 },
    /// A piece of an earlier attempt, or one already seen: not printed.
    Stale,
}

impl Order {
    fn observe(&mut self, piece: &Progress) -> Step {
        let step = match self.attempt {
            Some(attempt) if piece.attempt < attempt => return Step::Stale,
            Some(attempt) if piece.attempt > attempt => Step::StartsOver { previous: attempt },
            Some(_) if piece.seq < self.next => return Step::Stale,
            Some(_) if piece.seq > self.next => Step::Gap { from: self.next },
            None if piece.seq > 0 => Step::Gap { from: 0 },
            _ => Step::InOrder,
        };
        self.attempt = Some(piece.attempt);
        self.next = piece.seq + 1;
        step
    }
}

impl Step {
    fn prints(self) -> bool {
        self != Step::Stale
    }

    /// The note for stderr, if the step deserves one.
    fn note(self, piece: &Progress) -> Option<String> {
        let lost = |from: u64| {
            let count = piece.seq - from;
            let pieces = if count == 1 { "piece" } else { "pieces" };
            format!(
                "{count} {pieces} of attempt {} lost on the way; the result printed at the end is whole",
                piece.attempt
            )
        };
        match self {
            Step::InOrder | Step::Stale => None,
            Step::StartsOver { previous } if piece.seq == 0 => Some(format!(
                "attempt {previous} failed; attempt {} starts over",
                piece.attempt
            )),
            Step::StartsOver { previous } => Some(format!(
                "attempt {previous} failed; attempt {} starts over; {}",
                piece.attempt,
                lost(0)
            )),
            Step::Gap { from } => Some(lost(from)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_producer::TaskId;

    fn piece(attempt: u32, seq: u64) -> Progress {
        Progress {
            task_id: TaskId::new(),
            attempt: Attempt::new(attempt).expect("attempts count from 1"),
            seq,
            delta: format!("<{attempt}.{seq}>"),
        }
    }

    #[test]
    fn pieces_in_order_need_no_note() {
        let mut order = Order::default();
        for seq in 0..3 {
            let p = piece(1, seq);
            assert_eq!(order.observe(&p), Step::InOrder);
            assert_eq!(order.observe(&p).note(&p), None, "a repeat is stale");
        }
    }

    #[test]
    fn a_skipped_number_is_a_loss_that_says_how_many() {
        let mut order = Order::default();
        order.observe(&piece(1, 0));
        let p = piece(1, 3);
        let step = order.observe(&p);
        assert_eq!(step, Step::Gap { from: 1 });
        let note = step.note(&p).unwrap_or_default();
        assert!(note.starts_with("2 pieces of attempt 1 lost"), "{note}");
        assert!(
            note.ends_with("the result printed at the end is whole"),
            "{note}"
        );
        assert_eq!(order.observe(&piece(1, 4)), Step::InOrder);
        let first = piece(1, 2);
        assert_eq!(Order::default().observe(&first), Step::Gap { from: 0 });
    }

    #[test]
    fn a_retry_starts_over_and_the_old_attempt_is_left_behind() {
        let mut order = Order::default();
        order.observe(&piece(1, 0));
        order.observe(&piece(1, 1));
        let p = piece(2, 0);
        let step = order.observe(&p);
        assert_eq!(
            step,
            Step::StartsOver {
                previous: Attempt::FIRST
            }
        );
        assert_eq!(
            step.note(&p).as_deref(),
            Some("attempt 1 failed; attempt 2 starts over")
        );
        assert!(!order.observe(&piece(1, 2)).prints());
        assert_eq!(order.observe(&piece(2, 1)), Step::InOrder);
    }
}
