//! The runtime's writes to the Kubernetes API: create a task's Job and its owned Secret,
//! create a Job alone (a warm executor's), delete a Job. Writes pass a client-side token
//! bucket (so a burst of tasks does not flood the API server) and are retried with backoff
//! on 5xx, 429 (after `Retry-After`, which kube's client honours itself) and transport
//! failures. AlreadyExists on the Job means the attempt already has its Job (a redelivered
//! message): success, never a second Job. Each try is counted, and each failure by its HTTP
//! code, in the dispatcher's metrics.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PartialObjectMeta, PostParams, PropagationPolicy};
use kube::{Api, Client, Resource};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::metrics::ApiCalls;

/// Errors of the runtime's API calls.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot configure the Kubernetes client (in-cluster or kubeconfig): {0}")]
    Config(#[source] kube::Error),
    #[error("the Kubernetes API refused {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// Whether the job was made by this call or was there already, with its metadata (all the
/// runtime reads of it: name, uid, creation time).
#[derive(Debug, Clone)]
pub enum Created {
    New(Box<ObjectMeta>),
    Existing(Box<ObjectMeta>),
}

impl Created {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Created::New(m) | Created::Existing(m) => m,
        }
    }
}

/// One kind of API call: its name in messages, and its verb and resource in metrics.
#[derive(Debug, Clone, Copy)]
struct Call {
    what: &'static str,
    verb: &'static str,
    resource: &'static str,
}

const CREATE_JOB: Call = Call {
    what: "create Job",
    verb: "create",
    resource: "jobs",
};
const READ_JOB: Call = Call {
    what: "read Job",
    verb: "get",
    resource: "jobs",
};
const CREATE_SECRET: Call = Call {
    what: "create Secret",
    verb: "create",
    resource: "secrets",
};
const DELETE_JOB: Call = Call {
    what: "delete Job",
    verb: "delete",
    resource: "jobs",
};

/// A token bucket: `rate` writes per second, bursts up to `burst`.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: f64, burst: u32) -> Bucket {
        let burst = f64::from(burst.max(1));
        Bucket {
            rate: rate.max(0.001),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits for one token.
    async fn take(&self) {
        loop {
            let wait = {
                let mut state = self.state.lock().await;
                let (tokens, last) = *state;
                let now = Instant::now();
                let tokens =
                    (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
                if tokens >= 1.0 {
                    *state = (tokens - 1.0, now);
                    return;
                }
                *state = (tokens, now);
                Duration::from_secs_f64((1.0 - tokens) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// The runtime's API client for one namespace.
pub struct JobClient {
    client: Client,
    jobs: Api<Job>,
    secrets: Api<Secret>,
    bucket: Bucket,
    retry: ExponentialBuilder,
    calls: ApiCalls,
}

impl JobClient {
    /// A client for `namespace` (default: the client's own, i.e. the dispatcher's in a
    /// cluster), writing at most `writes_per_second` with bursts of `burst`.
    pub fn new(
        client: Client,
        namespace: Option<&str>,
        writes_per_second: f64,
        burst: u32,
    ) -> JobClient {
        let (jobs, secrets) = match namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::default_namespaced(client.clone()),
                Api::default_namespaced(client.clone()),
            ),
        };
        JobClient {
            client,
            jobs,
            secrets,
            bucket: Bucket::new(writes_per_second, burst),
            retry: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .with_max_times(8),
            calls: ApiCalls::default(),
        }
    }

    /// Counts its calls in `calls` (the dispatcher's metrics).
    pub(crate) fn with_metrics(self, calls: ApiCalls) -> JobClient {
        calls.touch();
        JobClient { calls, ..self }
    }

    /// A client from the in-cluster configuration or the local kubeconfig.
    ///
    /// # Errors
    /// Neither is usable.
    pub async fn infer(
        namespace: Option<&str>,
        writes_per_second: f64,
        burst: u32,
    ) -> Result<JobClient, KubeError> {
        let client = Client::try_default().await.map_err(KubeError::Config)?;
        Ok(JobClient::new(client, namespace, writes_per_second, burst))
    }

    /// Creates the Job, then its Secret owned by it: two API writes. A Job that exists is
    /// returned as it is; a Secret that exists is left alone.
    ///
    /// # Errors
    /// The API refused a write for good (invalid object, forbidden) or kept failing.
    pub async fn create(&self, job: &Job, secret: Secret) -> Result<Created, KubeError> {
        let created = self.create_job(job).await?;
        self.create_owned_secret(created.metadata(), secret).await?;
        Ok(created)
    }

    /// Creates the Job alone (a warm executor's, which has no Secret): one API write. A Job
    /// that exists is returned as it is.
    ///
    /// # Errors
    /// The API refused the write for good (invalid object, forbidden) or kept failing.
    pub async fn create_job(&self, job: &Job) -> Result<Created, KubeError> {
        let name = job.metadata.name.clone().unwrap_or_default();
        match self
            .write(CREATE_JOB, || self.create_object(&self.jobs, job))
            .await
        {
            Ok(meta) => Ok(Created::New(Box::new(meta))),
            Err(KubeError::Api {
                source: kube::Error::Api(status),
                ..
            }) if status.is_already_exists() => {
                debug!(job = %name, "job exists already; a redelivered task finds it");
                let existing = self
                    .write(READ_JOB, || self.jobs.get_metadata(&name))
                    .await?;
                Ok(Created::Existing(Box::new(existing.metadata)))
            }
            Err(e) => Err(e),
        }
    }

    /// Creates the Secret of an existing Job, owned by it, unless it exists: what a
    /// dispatcher that stopped between the Job and its Secret left undone. Never creates
    /// the Job.
    ///
    /// # Errors
    /// The Job cannot be read (or is gone), or the API refused the Secret.
    pub async fn complete(&self, job_name: &str, secret: Secret) -> Result<(), KubeError> {
        let job = self
            .write(READ_JOB, || self.jobs.get_metadata(job_name))
            .await?;
        self.create_owned_secret(&job.metadata, secret).await
    }

    /// Creates `secret` owned by the Job `owner`; one that exists is left alone.
    async fn create_owned_secret(
        &self,
        owner: &ObjectMeta,
        mut secret: Secret,
    ) -> Result<(), KubeError> {
        if let (Some(job_name), Some(uid)) = (&owner.name, &owner.uid) {
            secret.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "batch/v1".into(),
                kind: "Job".into(),
                name: job_name.clone(),
                uid: uid.clone(),
                controller: Some(false),
                block_owner_deletion: Some(false),
            }]);
        }
        match self
            .write(CREATE_SECRET, || self.create_object(&self.secrets, &secret))
            .await
        {
            Ok(_) => Ok(()),
            Err(KubeError::Api {
                source: kube::Error::Api(status),
                ..
            }) if status.is_already_exists() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes a Job with background propagation (its pods and Secret go with it). A Job
    /// that is already gone is not an error.
    ///
    /// # Errors
    /// The API refused the delete.
    pub async fn delete(&self, name: &str) -> Result<(), KubeError> {
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        match self
            .write(DELETE_JOB, || self.jobs.delete(name, &params))
            .await
        {
            Ok(_) => Ok(()),
            Err(KubeError::Api {
                source: kube::Error::Api(status),
                ..
            }) if status.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One API call behind the token bucket, retried while the failure may pass.
    /// POSTs `object` to `api`'s collection, as `Api::create` does, and reads back only
    /// the metadata of what the API server stored: a created Job comes back whole, pod
    /// template included, and a Secret with its payload, none of which the runtime reads.
    async fn create_object<K>(&self, api: &Api<K>, object: &K) -> Result<ObjectMeta, kube::Error>
    where
        K: Resource + Serialize,
    {
        let body = serde_json::to_vec(object).map_err(kube::Error::SerdeError)?;
        let mut request = kube::core::Request::new(api.resource_url())
            .create(&PostParams::default(), body)
            .map_err(kube::Error::BuildRequest)?;
        request.extensions_mut().insert("create");
        let created: PartialObjectMeta<K> = self.client.request(request).await?;
        Ok(created.metadata)
    }

    async fn write<T, F, Fut>(&self, kind: Call, call: F) -> Result<T, KubeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let mut call = call;
        let what = kind.what;
        let attempt = || {
            let fut = call();
            async {
                self.bucket.take().await;
                self.calls.tried(kind.verb, kind.resource);
                fut.await.inspect_err(|e| {
                    self.calls.failed(kind.verb, kind.resource, http_code(e));
                })
            }
        };
        attempt
            .retry(self.retry)
            .when(transient)
            .notify(
                |e, delay| warn!(what, error = %e, ?delay, "Kubernetes API call failed; retrying"),
            )
            .await
            .map_err(|source| KubeError::Api {
                what: what.to_owned(),
                source,
            })
    }
}

/// The HTTP code of a failed call, `transport` when no answer came, `other` when the
/// answer could not be read.
fn http_code(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => status.code.to_string(),
        kube::Error::HyperError(_) | kube::Error::Service(_) => "transport".into(),
        _ => "other".into(),
    }
}

/// Failures worth another try: server errors, throttling, transport.
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::Bucket;

    /// On tokio's paused clock: the bucket's waits are exactly what its rate asks, whatever
    /// the machine is doing.
    #[tokio::test(start_paused = true)]
    async fn the_bucket_lets_a_burst_through_then_paces_writes_at_its_rate() {
        let bucket = Bucket::new(10.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            bucket.take().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst goes at once");
        for _ in 0..5 {
            bucket.take().await;
        }
        let paced = start.elapsed();
        assert!(
            paced >= Duration::from_millis(500) && paced < Duration::from_millis(510),
            "five writes after the burst take 0.5 s at 10 per second: {paced:?}"
        );
        // Idle time refills the bucket up to its burst, no further.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let before = Instant::now();
        for _ in 0..4 {
            bucket.take().await;
        }
        let waited = before.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_millis(110),
            "three from the refilled burst, the fourth paced: {waited:?}"
        );
    }
}
