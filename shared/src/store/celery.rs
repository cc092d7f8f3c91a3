//! What is kept of a task from a Celery client (`celery_tasks`): its reply queue and Celery
//! context. See [`crate::celery`].

use chrono::{DateTime, Utc};
use tokio_postgres::Row;

use super::pool::Store;
use super::sql::{clean, pg};
use crate::Result;
use crate::celery::CeleryOrigin;
use crate::message::TaskId;

impl Store {
    /// Keeps a Celery task's origin, once: a message converted again (after a lost ack)
    /// leaves the first row as it is.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn record_celery_origin(&self, origin: &CeleryOrigin) -> Result<()> {
        let client = self.client().await?;
        let retries = i32::try_from(origin.retries).unwrap_or(i32::MAX);
        client
            .execute(
                "INSERT INTO celery_tasks (task_id, reply_to, root_id, parent_id, group_id,
                     retries, eta, deadline_from)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (task_id) DO NOTHING",
                &[
                    &origin.task_id.as_uuid(),
                    &clean(origin.reply_to.as_deref()),
                    &clean(origin.root_id.as_deref()),
                    &clean(origin.parent_id.as_deref()),
                    &clean(origin.group.as_deref()),
                    &retries,
                    &origin.eta,
                    &origin.deadline_from.as_str(),
                ],
            )
            .await
            .map_err(pg("record celery origin"))?;
        Ok(())
    }

    /// The Celery origin of a task, `None` for a task that did not come from Celery.
    ///
    /// # Errors
    /// Postgres errors, or a row this binary cannot read.
    pub async fn celery_origin(&self, id: TaskId) -> Result<Option<CeleryOrigin>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT * FROM celery_tasks WHERE task_id = $1",
                &[&id.as_uuid()],
            )
            .await
            .map_err(pg("read celery origin"))?;
        row.as_ref().map(origin_from_row).transpose()
    }
}

fn origin_from_row(r: &Row) -> Result<CeleryOrigin> {
    let read = || pg("read a celery origin");
    let deadline_from: String = r.try_get("deadline_from").map_err(read())?;
    let retries: i32 = r.try_get("retries").map_err(read())?;
    Ok(CeleryOrigin {
        task_id: TaskId::from(r.try_get::<_, uuid::Uuid>("task_id").map_err(read())?),
        reply_to: r.try_get("reply_to").map_err(read())?,
        root_id: r.try_get("root_id").map_err(read())?,
        parent_id: r.try_get("parent_id").map_err(read())?,
        group: r.try_get("group_id").map_err(read())?,
        retries: u32::try_from(retries).unwrap_or(0),
        eta: r
            .try_get::<_, Option<DateTime<Utc>>>("eta")
            .map_err(read())?,
        deadline_from: deadline_from
            .parse()
            .map_err(|message| crate::Error::Config {
                origin: "celery_tasks.deadline_from".into(),
                message,
            })?,
    })
}
