//! [`Attempt`]: the number of one attempt of a task, from 1.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The number of one attempt of a task: 1 for the first, one more for each retry or
/// replay. Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Attempt(u32);

impl Attempt {
    /// The first attempt.
    pub const FIRST: Attempt = Attempt(1);

    /// Attempt `n`; `None` for 0.
    pub fn new(n: u32) -> Option<Attempt> {
        (n >= 1).then_some(Attempt(n))
    }

    /// Its number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The attempt after this one.
    pub fn next(self) -> Attempt {
        Attempt(self.0.saturating_add(1))
    }
}

impl TryFrom<u32> for Attempt {
    type Error = String;

    fn try_from(n: u32) -> Result<Attempt, String> {
        Attempt::new(n).ok_or_else(|| "attempt 0: attempts count from 1".to_owned())
    }
}

impl From<Attempt> for u32 {
    fn from(a: Attempt) -> u32 {
        a.0
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::Attempt;

    #[test]
    fn attempts_count_from_one_on_the_wire_too() {
        assert_eq!(Attempt::new(0), None);
        assert_eq!(Attempt::FIRST.next().get(), 2);
        assert_eq!(serde_json::to_string(&Attempt::FIRST.next()).unwrap(), "2");
        assert_eq!(serde_json::from_str::<Attempt>("3").unwrap().get(), 3);
        let zero = serde_json::from_str::<Attempt>("0").unwrap_err();
        assert!(zero.to_string().contains("attempts count from 1"), "{zero}");
    }
}
