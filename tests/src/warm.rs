//! What every task that ran on a warm executor shows, on either runtime: a job of its
//! class, and a place in that job (`warm_seq`) that no other task had.

use std::collections::BTreeSet;

use gantry_shared::store::TaskRecord;

/// The places in warm jobs taken so far.
#[derive(Debug, Default)]
pub struct Places(BTreeSet<(String, u32)>);

impl Places {
    /// Checks that `record` ran warm on a job of `class`, at a place of its own; its job.
    ///
    /// # Panics
    /// When it did not.
    pub fn take(&mut self, record: &TaskRecord, class: &str) -> String {
        let job = record.job_name.clone().expect("a job name");
        assert!(job.starts_with(&format!("gantry-w-{class}-")), "{job}");
        let seq = record
            .warm_seq
            .expect("ran warm, with its place in the job");
        assert!(
            self.0.insert((job.clone(), seq)),
            "one place per task: {job} {seq}"
        );
        job
    }
}
