//! `gantry.progress/v1`: a piece of an answer while it is made (an LLM's tokens), for a task
//! submitted with streaming on.
//!
//! Progress is best effort: published without waiting for confirms, never stored, and
//! never a substitute for the result, which is stored as always and equals the
//! concatenated deltas. Sequence numbers count from 0 within an attempt, so a reader sees a
//! gap (a lost message) or a new attempt starting over.

use chrono::Utc;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::{Deserialize, Serialize};

use super::amqp::{FieldTableExt, headers};
use super::attempt::Attempt;
use super::names::TaskId;
use super::rejection::Rejection;
use super::schema::{CONTENT_TYPE, PROGRESS_SCHEMA};

/// The body of a progress message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub task_id: TaskId,
    pub attempt: Attempt,
    /// 0, 1, 2, … within the attempt.
    pub seq: u64,
    /// The text generated since the previous message.
    pub delta: String,
}

impl Progress {
    /// Body and properties for publishing: transient (progress is worth nothing after a
    /// broker restart), correlated with the task.
    ///
    /// # Errors
    /// Only if the message cannot be serialized (it always can).
    pub fn to_amqp(&self) -> Result<(Vec<u8>, BasicProperties), serde_json::Error> {
        let body = serde_json::to_vec(self)?;
        let mut table = FieldTable::default();
        table.insert(
            headers::SCHEMA.into(),
            AMQPValue::LongString(PROGRESS_SCHEMA.into()),
        );
        table.insert(
            headers::ATTEMPT.into(),
            AMQPValue::LongLongInt(self.attempt.get().into()),
        );
        let props = BasicProperties::default()
            .with_correlation_id(ShortString::from(self.task_id.to_string()))
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(1)
            .with_timestamp(Utc::now().timestamp().max(0) as u64)
            .with_headers(table);
        Ok((body, props))
    }

    /// Whether a message with these properties is a progress message (a reply queue gets
    /// progress and the result).
    pub fn is_progress(props: &BasicProperties) -> bool {
        props
            .headers()
            .as_ref()
            .and_then(|h| h.get_str(headers::SCHEMA))
            == Some(PROGRESS_SCHEMA)
    }

    /// Parses a progress message.
    ///
    /// # Errors
    /// A [`Rejection`] saying what is wrong.
    pub fn from_amqp(props: &BasicProperties, body: &[u8]) -> Result<Progress, Rejection> {
        if !Progress::is_progress(props) {
            return Err(Rejection::WrongSchema(format!(
                "header {} is not {PROGRESS_SCHEMA:?}",
                headers::SCHEMA
            )));
        }
        serde_json::from_slice(body).map_err(|e| Rejection::WrongSchema(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_survives_the_round_trip_and_is_told_apart() {
        let p = Progress {
            task_id: TaskId::new(),
            attempt: Attempt::FIRST,
            seq: 3,
            delta: " world".into(),
        };
        let (body, props) = p.to_amqp().unwrap();
        assert!(Progress::is_progress(&props));
        assert_eq!(Progress::from_amqp(&props, &body).unwrap(), p);
        assert!(!Progress::is_progress(&BasicProperties::default()));
        assert!(Progress::from_amqp(&BasicProperties::default(), &body).is_err());
    }
}
