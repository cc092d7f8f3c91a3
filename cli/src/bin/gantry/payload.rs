//! `--payload`: inline JSON, `@FILE`, or `@-` for standard input.

use std::io::Read;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// Reads and parses the payload `arg` names; `stdin` is read only for `@-`. Blocking: call
/// it from a blocking thread.
///
/// # Errors
/// The file or standard input cannot be read, or the text is not JSON (the message says
/// where: line and column).
pub(crate) fn load(arg: &str, mut stdin: impl Read) -> Result<Value> {
    match arg.strip_prefix('@') {
        None => parse(arg, "--payload").map_err(|e| {
            anyhow!(
                "{e}; pass JSON quoted for the shell (--payload '{{\"key\":\"value\"}}'), or @FILE"
            )
        }),
        Some("") => {
            bail!("--payload @ names no file: write @FILE to read a file, or @- for standard input")
        }
        Some("-") => {
            let mut text = String::new();
            stdin
                .read_to_string(&mut text)
                .context("cannot read the payload from standard input")?;
            parse(&text, "the payload on standard input")
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read payload file {path}"))?;
            parse(&text, &format!("payload file {path}"))
        }
    }
}

fn parse(text: &str, origin: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| anyhow!("{origin} is not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Write;

    fn no_stdin() -> &'static [u8] {
        b""
    }

    #[test]
    fn inline_json_is_the_payload() {
        let v = load(r#"{"hello":"world"}"#, no_stdin()).unwrap();
        assert_eq!(v, json!({"hello": "world"}));
        assert_eq!(load("{}", no_stdin()).unwrap(), json!({}));
        assert_eq!(load("[1, 2]", no_stdin()).unwrap(), json!([1, 2]));
    }

    #[test]
    fn invalid_json_names_line_and_column() {
        let e = load("{\n  \"a\": 1,\n  oops\n}", no_stdin()).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("--payload is not valid JSON"), "{text}");
        assert!(text.contains("line 3 column 3"), "{text}");
        assert!(text.contains("@FILE"), "{text}");
    }

    #[test]
    fn a_file_is_read_after_the_at_sign() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "{{\"prompt\": \"hi\"}}").unwrap();
        let arg = format!("@{}", file.path().display());
        let v = load(&arg, no_stdin()).unwrap();
        assert_eq!(v, json!({"prompt": "hi"}));
    }

    #[test]
    fn an_invalid_file_is_named_in_the_error() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        write!(file, "{{\"prompt\": }}").unwrap();
        let path = file.path().display().to_string();
        let e = load(&format!("@{path}"), no_stdin()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("payload file {path} is not valid JSON")),
            "{text}"
        );
        assert!(text.contains("line 1 column 12"), "{text}");
    }

    #[test]
    fn a_missing_file_says_it_cannot_be_read() {
        let e = load("@/nonexistent/payload.json", no_stdin()).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.starts_with("cannot read payload file /nonexistent/payload.json: "),
            "{text}"
        );
    }

    #[test]
    fn at_dash_reads_standard_input() {
        let v = load("@-", &b"{\"n\": 3}"[..]).unwrap();
        assert_eq!(v, json!({"n": 3}));
        let e = load("@-", &b""[..]).unwrap_err();
        assert!(e.to_string().contains("standard input is not valid JSON"));
        assert!(load("@", no_stdin()).is_err());
    }
}
