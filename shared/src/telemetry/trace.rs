//! A task's trace: the spans that follow it through the processes it crosses, and the W3C
//! `traceparent` that joins them. A span made with target [`TARGET`] is exported when the
//! process exports spans (`otlp_endpoint`, see [`super::init_service`]); without that,
//! these functions answer `None` and do nothing, and the `traceparent` travels as before.

/// The target of the spans a task's trace is made of; spans of any other target are not
/// exported.
pub const TARGET: &str = "gantry::trace";

/// The `traceparent` that names `span` as the parent, when the process exports spans.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    #[cfg(feature = "otlp")]
    {
        otel::traceparent(span)
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = span;
        None
    }
}

/// Makes `span` a child of the span `traceparent` names (from another process). A missing
/// or malformed `traceparent` leaves it where it is; so does a process that exports nothing.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    #[cfg(feature = "otlp")]
    {
        if let Some(tp) = traceparent {
            otel::set_parent(span, tp);
        }
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = (span, traceparent);
    }
}

/// The `traceparent` ⇄ OpenTelemetry context conversions.
#[cfg(feature = "otlp")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// The `traceparent` of `span`, when it is exported.
    pub(super) fn traceparent(span: &tracing::Span) -> Option<String> {
        let cx = span.context();
        let span_ref = cx.span();
        let sc = span_ref.span_context();
        sc.is_valid().then(|| {
            format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            )
        })
    }

    /// Makes `span` a child of the remote span `traceparent` names, if it is well formed.
    pub(super) fn set_parent(span: &tracing::Span, traceparent: &str) {
        let Some(remote) = parse(traceparent) else {
            return;
        };
        let cx = opentelemetry::Context::new().with_remote_span_context(remote);
        // A span not exported (no layer, or disabled) has no parent to set: nothing to do.
        let _ = span.set_parent(cx);
    }

    /// A version-00 `traceparent` as a remote span context.
    fn parse(traceparent: &str) -> Option<SpanContext> {
        let mut parts = traceparent.split('-');
        let (Some("00"), Some(trace), Some(span), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let sc = SpanContext::new(
            TraceId::from_hex(trace).ok()?,
            SpanId::from_hex(span).ok()?,
            TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
            true,
            TraceState::default(),
        );
        sc.is_valid().then_some(sc)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_traceparent_is_read_back_as_it_was_written() {
            let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            let sc = parse(tp).expect("a well-formed traceparent");
            assert_eq!(
                sc.trace_id().to_string(),
                "0af7651916cd43dd8448eb211c80319c"
            );
            assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
            assert!(sc.is_sampled() && sc.is_remote());
            assert!(parse("00-abc-def-01").is_none());
            assert!(parse("00-00000000000000000000000000000000-b7ad6b7169203331-01").is_none());
        }
    }
}
