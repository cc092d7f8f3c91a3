//! Failures as the API server reports them: a `v1` `Status` body with the HTTP code, the
//! machine-readable reason and, for validation, one cause per field.

use serde_json::{Value, json};

use crate::kinds::Kind;

/// A failed request: the `Status` the API server would answer with.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    pub(crate) details: Option<Value>,
    /// Seconds for a `Retry-After` header (429).
    pub(crate) retry_after: Option<u64>,
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub(crate) fn not_found(kind: Kind, name: &str) -> ApiError {
        let mut e = ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
        );
        e.details = Some(resource_details(kind, name));
        e
    }

    pub(crate) fn namespace_not_found(namespace: &str) -> ApiError {
        ApiError::not_found(Kind::Namespace, namespace)
    }

    /// The answer for a URL that names nothing the server knows.
    pub(crate) fn no_such_path() -> ApiError {
        let mut e = ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        e.details = Some(json!({}));
        e
    }

    pub(crate) fn method_not_allowed(method: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub(crate) fn already_exists(kind: Kind, name: &str) -> ApiError {
        let mut e = ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", kind.qualified()),
        );
        e.details = Some(resource_details(kind, name));
        e
    }

    /// 409 Conflict: `what` is what went wrong after the resource's name.
    pub(crate) fn conflict(kind: Kind, name: &str, what: &str) -> ApiError {
        let mut e = ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {what}",
                kind.qualified()
            ),
        );
        e.details = Some(resource_details(kind, name));
        e
    }

    pub(crate) fn stale(kind: Kind, name: &str) -> ApiError {
        ApiError::conflict(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub(crate) fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub(crate) fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (the double: {content_type} is not supported)"
            ),
        )
    }

    /// 422 Invalid with every problem found.
    pub(crate) fn invalid(kind: Kind, name: &str, errors: &[FieldError]) -> ApiError {
        let lines: Vec<String> = errors.iter().map(FieldError::to_string).collect();
        let joined = if lines.len() == 1 {
            lines[0].clone()
        } else {
            format!("[{}]", lines.join(", "))
        };
        let mut e = ApiError::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {joined}", kind.qualified_kind()),
        );
        let causes: Vec<Value> = errors
            .iter()
            .map(|f| json!({"reason": f.kind.reason(), "message": f.message(), "field": f.field}))
            .collect();
        e.details = Some(json!({
            "name": name,
            "group": kind.group(),
            "kind": kind.name(),
            "causes": causes,
        }));
        e
    }

    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        let message = message.into();
        let mut e = ApiError::new(
            500,
            "InternalError",
            format!("Internal error occurred: {message}"),
        );
        e.details = Some(json!({"causes": [{"message": message}]}));
        e
    }

    pub(crate) fn too_many_requests(retry_after: u64) -> ApiError {
        let mut e = ApiError::new(
            429,
            "TooManyRequests",
            "Too many requests, please try again later.",
        );
        e.details = Some(json!({"retryAfterSeconds": retry_after}));
        e.retry_after = Some(retry_after);
        e
    }

    /// The `Status` body.
    pub(crate) fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

fn resource_details(kind: Kind, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": kind.plural()});
    if !kind.group().is_empty() {
        d["group"] = json!(kind.group());
    }
    d
}

/// What is wrong with one field (the API server's `field.Error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldErrorKind {
    Required,
    Invalid,
    NotSupported,
    Duplicate,
    TooLong,
    NotFound,
    Forbidden,
}

impl FieldErrorKind {
    fn reason(self) -> &'static str {
        match self {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::NotSupported => "FieldValueNotSupported",
            FieldErrorKind::Duplicate => "FieldValueDuplicate",
            FieldErrorKind::TooLong => "FieldValueTooLong",
            FieldErrorKind::NotFound => "FieldValueNotFound",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct FieldError {
    pub(crate) field: String,
    pub(crate) kind: FieldErrorKind,
    /// The offending value, already rendered (`"Foo"`, `-1`).
    pub(crate) value: String,
    pub(crate) detail: String,
}

impl FieldError {
    pub(crate) fn required(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Required,
            value: String::new(),
            detail: detail.into(),
        }
    }

    /// An invalid string value.
    pub(crate) fn invalid(
        field: impl Into<String>,
        value: &str,
        detail: impl Into<String>,
    ) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Invalid,
            value: format!("{value:?}"),
            detail: detail.into(),
        }
    }

    /// An invalid value rendered as is (numbers, objects).
    pub(crate) fn invalid_raw(
        field: impl Into<String>,
        value: impl ToString,
        detail: impl Into<String>,
    ) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Invalid,
            value: value.to_string(),
            detail: detail.into(),
        }
    }

    pub(crate) fn not_supported(
        field: impl Into<String>,
        value: &str,
        supported: &[&str],
    ) -> FieldError {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::NotSupported,
            value: format!("{value:?}"),
            detail: format!("supported values: {}", list.join(", ")),
        }
    }

    pub(crate) fn duplicate(field: impl Into<String>, value: &str) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Duplicate,
            value: format!("{value:?}"),
            detail: String::new(),
        }
    }

    pub(crate) fn too_long(field: impl Into<String>, max: usize) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::TooLong,
            value: String::new(),
            detail: format!("may not be more than {max} bytes"),
        }
    }

    pub(crate) fn not_found(field: impl Into<String>, value: &str) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::NotFound,
            value: format!("{value:?}"),
            detail: String::new(),
        }
    }

    pub(crate) fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Forbidden,
            value: String::new(),
            detail: detail.into(),
        }
    }

    /// The cause's message: the error without its field.
    pub(crate) fn message(&self) -> String {
        let with_detail = |head: String| {
            if self.detail.is_empty() {
                head
            } else {
                format!("{head}: {}", self.detail)
            }
        };
        match self.kind {
            FieldErrorKind::Required => with_detail("Required value".into()),
            FieldErrorKind::Invalid => with_detail(format!("Invalid value: {}", self.value)),
            FieldErrorKind::NotSupported => {
                with_detail(format!("Unsupported value: {}", self.value))
            }
            FieldErrorKind::Duplicate => format!("Duplicate value: {}", self.value),
            FieldErrorKind::TooLong => with_detail("Too long".into()),
            FieldErrorKind::NotFound => format!("Not found: {}", self.value),
            FieldErrorKind::Forbidden => with_detail("Forbidden".into()),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message())
    }
}
