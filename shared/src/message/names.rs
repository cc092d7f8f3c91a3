//! Identifiers and names that parse rather than validate later.

use std::fmt;
use std::str::FromStr;

use super::attempt::Attempt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A name or id that does not parse; its text says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidName(pub String);

impl From<InvalidName> for String {
    fn from(e: InvalidName) -> String {
        e.0
    }
}

/// A task's identity: a UUID, also the AMQP `message_id` and `correlation_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(Uuid);

impl TaskId {
    /// A fresh random task id.
    pub fn new() -> Self {
        TaskId(Uuid::new_v4())
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for TaskId {
    fn from(id: Uuid) -> Self {
        TaskId(id)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim())
            .map(TaskId)
            .map_err(|e| InvalidName(format!("task id {s:?} is not a UUID ({e})")))
    }
}

/// A task name such as `llm.chat` or `myapp.tasks.summarize` (Celery-style dotted names).
///
/// 1 to 200 characters of ASCII letters, digits, `.`, `_`, `-` and `:`, starting with a
/// letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskName(String);

impl TaskName {
    /// Longest accepted name.
    pub const MAX_LEN: usize = 200;

    /// Parses a task name.
    ///
    /// # Errors
    /// A sentence saying what is wrong with the name.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(InvalidName(format!(
                "task name must be 1 to {} characters, got {}",
                Self::MAX_LEN,
                s.len()
            )));
        }
        if !s.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(InvalidName(format!(
                "task name {s:?} must start with a letter or digit"
            )));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
        {
            return Err(InvalidName(format!(
                "task name {s:?} has {c:?}; use letters, digits, '.', '_', '-' or ':'"
            )));
        }
        Ok(TaskName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TaskName {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, InvalidName> {
        TaskName::parse(&s)
    }
}

impl From<TaskName> for String {
    fn from(n: TaskName) -> String {
        n.0
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An executor class (`vllm`, `embed`, `echo`): the routing key of its tasks, part of its
/// queue name and a Kubernetes label value.
///
/// A DNS-1123 label of at most 40 characters: lowercase letters, digits and `-`, starting and
/// ending with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExecutorClass(String);

impl ExecutorClass {
    /// Longest accepted class name (leaves room in queue and Job names).
    pub const MAX_LEN: usize = 40;

    /// Parses an executor class.
    ///
    /// # Errors
    /// A sentence saying what is wrong with the name.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let ok_ends = s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
        if s.is_empty() || s.len() > Self::MAX_LEN || !ok_chars || !ok_ends {
            return Err(InvalidName(format!(
                "executor class {s:?} must be 1 to {} lowercase letters, digits or '-', starting and ending with a letter or digit",
                Self::MAX_LEN
            )));
        }
        Ok(ExecutorClass(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ExecutorClass {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, InvalidName> {
        ExecutorClass::parse(&s)
    }
}

impl From<ExecutorClass> for String {
    fn from(n: ExecutorClass) -> String {
        n.0
    }
}

impl fmt::Display for ExecutorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The deterministic name of the job that runs one attempt of a task: `gantry-<uuid>-a<n>`,
/// a DNS-1123 label of at most 63 characters. A redelivered message computes the same name
/// and so finds its job instead of creating a second one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobName(String);

impl JobName {
    pub fn for_task(id: TaskId, attempt: Attempt) -> Self {
        // 7 + 32 + 2 + up to 10 digits = at most 51 characters.
        JobName(format!("gantry-{}-a{attempt}", id.as_uuid().simple()))
    }

    /// A new warm executor of `class`: `gantry-w-<class>-<10 hex>`, at most 60 characters.
    pub fn for_warm(class: &ExecutorClass) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        JobName(format!("gantry-w-{class}-{}", &id[..10]))
    }

    /// Whether this names a warm executor (see [`JobName::for_warm`]).
    pub fn is_warm(&self) -> bool {
        Self::names_warm(&self.0)
    }

    /// Whether `name` is a warm executor's job name.
    pub fn names_warm(name: &str) -> bool {
        name.starts_with("gantry-w-")
    }

    /// A job name as recorded (a warm executor's, found in a task's evidence).
    pub fn recorded(name: &str) -> Self {
        JobName(name.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_follow_celery_conventions() {
        assert!(TaskName::parse("myapp.tasks.add").is_ok());
        assert!(TaskName::parse("llm.chat").is_ok());
        assert!(TaskName::parse("").is_err());
        assert!(TaskName::parse(".hidden").is_err());
        assert!(TaskName::parse("bad name").is_err());
        assert!(TaskName::parse(&"a".repeat(201)).is_err());
    }

    #[test]
    fn executor_classes_are_dns_labels() {
        assert!(ExecutorClass::parse("vllm").is_ok());
        assert!(ExecutorClass::parse("embed-v2").is_ok());
        assert!(ExecutorClass::parse("VLLM").is_err());
        assert!(ExecutorClass::parse("-x").is_err());
        assert!(ExecutorClass::parse("x-").is_err());
        assert!(ExecutorClass::parse("a.b").is_err());
        assert!(ExecutorClass::parse(&"a".repeat(41)).is_err());
    }

    #[test]
    fn job_names_are_deterministic_dns_labels() {
        let id = TaskId::new();
        let name = JobName::for_task(id, Attempt::new(4_000_000_000).expect("not 0"));
        assert_eq!(
            name,
            JobName::for_task(id, Attempt::new(4_000_000_000).expect("not 0"))
        );
        assert_ne!(name, JobName::for_task(id, Attempt::FIRST.next()));
        assert!(name.as_str().len() <= 63);
        assert!(
            name.as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
}
