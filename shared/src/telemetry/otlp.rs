//! Exporting a task's spans over OTLP/HTTP (protobuf): the tracer provider, and a batch
//! processor on a thread of its own.
//!
//! Exporting never holds up the service: spans wait in a bounded queue (a full queue drops
//! them), each export has a deadline, and a receiver that does not answer is logged once
//! when it stops answering and once when it answers again, not once per batch.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// How long one export may take before it is given up (its spans are dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a process that ends waits for its last spans to go out.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(3);

/// The exporter of one process; [`Exporting::shutdown`] sends what is still queued.
#[derive(Debug, Clone)]
pub(super) struct Exporting {
    provider: SdkTracerProvider,
}

impl Exporting {
    /// Sends the spans still queued (waiting at most 3 seconds) and stops exporting. Runs
    /// on a blocking thread, so that the runtime that carries the exports stays free.
    pub(super) async fn shutdown(self) {
        let provider = self.provider;
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_AT_EXIT))
                .await;
        if let Ok(Err(e)) = flushed {
            tracing::debug!(error = %e, "spans left unsent at exit");
        }
    }
}

/// A tracer provider exporting to `endpoint` (`http://host:4318`) as `service`, and the
/// layer that turns the spans of [`super::trace::TARGET`] into its spans.
///
/// # Errors
/// There is no Tokio runtime to carry the exports, or the endpoint is not a URL.
pub(super) fn pipeline<S>(
    service: &str,
    endpoint: &str,
) -> Result<(Exporting, impl Layer<S> + Send + Sync + 'static), String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| "spans are exported from a Tokio runtime, and there is none".to_owned())?;
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let client = OnRuntime {
        handle,
        inner: opentelemetry_http::hyper::HyperClient::with_default_connector(EXPORT_TIMEOUT, None),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("{url}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Reporting {
            inner: exporter,
            url,
            failing: Arc::new(AtomicBool::new(false)),
        })
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    let tracer = provider.tracer("gantry");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // A span's parent is found through `tracing`'s own tree: no OpenTelemetry context
        // to activate at each poll, and no busy/idle clock read there either.
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target() == super::trace::TARGET
        }));
    Ok((Exporting { provider }, layer))
}

/// The OTLP exporter, saying once that the receiver stopped answering and once that it
/// answers again.
#[derive(Debug)]
struct Reporting<E> {
    inner: E,
    url: String,
    failing: Arc<AtomicBool>,
}

impl<E: SpanExporter> SpanExporter for Reporting<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let spans = batch.len();
        let sent = self.inner.export(batch);
        async move {
            let outcome = sent.await;
            match &outcome {
                Ok(()) => {
                    if self.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(endpoint = %self.url, "spans reach the OTLP receiver again");
                    }
                }
                Err(e) => {
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(endpoint = %self.url, error = %e, spans,
                            "cannot export spans; dropping them until the OTLP receiver answers (said once)");
                    }
                }
            }
            outcome
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The hyper client, run on the process's Tokio runtime: the batch processor exports from
/// a thread of its own, where hyper would find no runtime.
#[derive(Debug, Clone)]
struct OnRuntime {
    handle: tokio::runtime::Handle,
    inner: opentelemetry_http::hyper::HyperClient,
}

impl HttpClient for OnRuntime {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let inner = self.inner.clone();
        let sent = self
            .handle
            .spawn(async move { inner.send_bytes(request).await });
        Box::pin(async move {
            sent.await
                .map_err(|e| HttpError::from(format!("the export was cancelled: {e}")))?
        })
    }
}
