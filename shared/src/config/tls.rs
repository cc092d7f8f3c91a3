//! TLS to RabbitMQ (`amqps://`) and Postgres (`sslmode=`): the certificates trusted, the
//! rustls client configuration made from them (ring is the crypto provider), the TLS words
//! of the two URLs, and what a refused server certificate means.
//!
//! A connection trusts one CA file (PEM) and nothing else, or without one the system's
//! trusted roots. Each URL may name its own CA file as its server's own clients spell it,
//! `cacertfile=` for RabbitMQ and `sslrootcert=` for Postgres; [`Config::load`] writes
//! `tls_ca_file` into the URLs that ask for TLS and name none.
//!
//! [`Config::load`]: super::Config::load

use std::path::{Path, PathBuf};
use std::sync::Arc;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::{Error, Result};

/// Where to name the CA file, for the messages about a RabbitMQ certificate.
pub const AMQP_CA_SETTING: &str = "GANTRY_TLS_CA_FILE (or cacertfile= in GANTRY_AMQP_URL)";
/// Where to name the CA file, for the messages about a Postgres certificate.
pub const POSTGRES_CA_SETTING: &str = "GANTRY_TLS_CA_FILE (or sslrootcert= in GANTRY_DATABASE_URL)";

/// The certificates a connection trusts to have signed its server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The CA certificates in this PEM file, and no other.
    CaFile(PathBuf),
    /// The system's trusted roots (Debian: the `ca-certificates` package; `SSL_CERT_FILE`
    /// names another bundle).
    System,
}

/// What of a server's certificate is checked, beyond its validity dates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Signed by a trusted CA, and naming the host as the URL does.
    ChainAndName,
    /// Signed by a trusted CA, whichever host it names: Postgres's `sslmode=verify-ca`.
    Chain,
}

impl std::fmt::Display for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::CaFile(path) => write!(f, "the CA in {}", path.display()),
            Trust::System => f.write_str("any of the system's trusted roots"),
        }
    }
}

impl Trust {
    /// From a URL's CA setting: a file, or `system` (libpq's word); none means the system's.
    fn from_setting(value: Option<String>) -> Trust {
        match value {
            None => Trust::System,
            Some(v) if v == "system" => Trust::System,
            Some(path) => Trust::CaFile(path.into()),
        }
    }

    /// The client configuration of a connection that trusts these certificates.
    ///
    /// # Errors
    /// [`Error::TlsCaFile`] when the CA file cannot be read or holds no certificate;
    /// [`Error::TlsSystemRoots`] when there are no system roots.
    pub fn client_config(&self, check: Check) -> Result<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(self.roots()?);
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::TlsSystemRoots(e.to_string()))?;
        let config = match check {
            Check::ChainAndName => builder.with_root_certificates(roots),
            Check::Chain => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly {
                    roots,
                    algorithms: provider.signature_verification_algorithms,
                })),
        };
        Ok(config.with_no_client_auth())
    }

    fn roots(&self) -> Result<RootCertStore> {
        match self {
            Trust::CaFile(path) => read_ca_file(path),
            Trust::System => system_roots(),
        }
    }
}

/// Reads the CA certificates of a PEM file.
///
/// # Errors
/// [`Error::TlsCaFile`]: the file cannot be read, is not PEM, or holds no certificate.
pub fn read_ca_file(path: &Path) -> Result<RootCertStore> {
    let problem = |problem: String| Error::TlsCaFile {
        path: path.display().to_string(),
        problem,
    };
    let pem = std::fs::read(path).map_err(|e| problem(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| problem(format!("it is not a PEM file ({e})")))?;
    if certs.is_empty() {
        return Err(problem(
            "it holds no certificate (PEM, -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| problem(format!("a certificate in it is not usable ({e})")))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(Error::TlsSystemRoots(if errors.is_empty() {
            "none found".into()
        } else {
            errors.join("; ")
        }));
    }
    Ok(roots)
}

/// Checks that a server's certificate was signed by a trusted CA, and not the host it
/// names: libpq's `sslmode=verify-ca`. The handshake's own signatures are checked as usual.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// When `error`, or what caused it, is `server` refusing to be trusted (its certificate
/// failed the check), the error that says so: whose certificate, why, and what to check.
/// `setting` is where the CA file is named.
pub fn refusal(
    error: &(dyn std::error::Error + 'static),
    server: &str,
    trust: &Trust,
    setting: &str,
) -> Option<Error> {
    let rustls::Error::InvalidCertificate(why) = rustls_error(error)? else {
        return None;
    };
    let problem = match why {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => {
            format!("is not signed by {trust} ({why:?}); check {setting}")
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "does not name the host it was reached by ({why:?}); connect by a name the certificate holds"
            )
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => format!(
            "is not valid now ({why:?}); renew it, or check the clocks of this machine and the server"
        ),
        other => format!("was refused ({other:?}); check {setting}"),
    };
    Some(Error::TlsCertificate {
        server: server.to_owned(),
        problem,
    })
}

/// The rustls error in an error's chain of causes, also inside an I/O error (where TLS
/// streams put it).
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// What a URL's query may hold as it is: all but the characters that end or encode a value.
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'=')
    .add(b'?')
    .add(b'\'');

/// The trust of an `amqps://` URL (its `cacertfile=`, else the system's roots), or `None`
/// for a plain `amqp://` one.
pub fn amqp_trust(url: &url::Url) -> Option<Trust> {
    (url.scheme() == "amqps").then(|| {
        Trust::from_setting(
            url.query_pairs()
                .find(|(key, _)| key == "cacertfile")
                .map(|(_, v)| v.into_owned()),
        )
    })
}

/// An `amqps://` URL that names no CA file, with `ca_file` named; `None` for any other.
pub fn amqp_with_ca_file(url: &str, ca_file: &Path) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    if amqp_trust(&parsed)? != Trust::System || parsed.query_pairs().any(|(k, _)| k == "cacertfile")
    {
        return None;
    }
    Some(with_query_param(
        url,
        "cacertfile",
        &ca_file.to_string_lossy(),
    ))
}

fn with_query_param(url: &str, key: &str, value: &str) -> String {
    let separator = match url.split_once('?') {
        None => "?",
        Some((_, "")) => "",
        Some(_) => "&",
    };
    format!(
        "{url}{separator}{key}={}",
        utf8_percent_encode(value, QUERY_VALUE)
    )
}

/// The TLS a Postgres URL asks for with libpq's `sslmode` and `sslrootcert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresTls {
    pub check: Check,
    pub trust: Trust,
}

/// Reads libpq's TLS words in a Postgres URL (`postgres://…?sslmode=…` or `key=value …`),
/// which tokio-postgres does not all know: returns the URL for tokio-postgres, without
/// `sslrootcert` and with `sslmode=require` for `verify-ca` and `verify-full`, and the TLS
/// asked for, `None` for none (no `sslmode`, `disable`, `prefer`: Gantry does not try TLS
/// and fall back).
///
/// `require` and `verify-ca` check the chain to the CA file, not the host name (libpq's
/// `require` does so when it has a CA file); `verify-full` checks both. Gantry never takes
/// a certificate unchecked, so `require` and `verify-ca` need a CA file: against the
/// system's roots, any certificate a public CA signed would pass.
///
/// # Errors
/// [`Error::DatabaseUrl`]: a malformed URL, or `require`/`verify-ca` without a CA file.
pub fn postgres_tls(url: &str) -> Result<(String, Option<PostgresTls>)> {
    let params = ConnParams::parse(url)?;
    let mode = params.value("sslmode");
    let root = params.value("sslrootcert");
    let check = match mode.as_deref() {
        Some("verify-full") => Check::ChainAndName,
        Some("require" | "verify-ca") => Check::Chain,
        _ => return Ok((params.without_tls_words(), None)),
    };
    let trust = Trust::from_setting(root);
    if check == Check::Chain && trust == Trust::System {
        return Err(Error::DatabaseUrl(format!(
            "sslmode={} checks the server's certificate against a CA file, and none is named: set GANTRY_TLS_CA_FILE or sslrootcert=, or set sslmode=verify-full to trust the system's roots",
            mode.unwrap_or_default()
        )));
    }
    Ok((
        params.without_tls_words(),
        Some(PostgresTls { check, trust }),
    ))
}

/// A Postgres URL that asks for TLS and names no CA file, with `ca_file` named; `None` for
/// any other.
///
/// # Errors
/// [`Error::DatabaseUrl`]: a malformed URL.
pub fn postgres_with_ca_file(url: &str, ca_file: &Path) -> Result<Option<String>> {
    let params = ConnParams::parse(url)?;
    let asks_for_tls = matches!(
        params.value("sslmode").as_deref(),
        Some("require" | "verify-ca" | "verify-full")
    );
    if !asks_for_tls || params.value("sslrootcert").is_some() {
        return Ok(None);
    }
    let path = ca_file.to_string_lossy();
    Ok(Some(if params.is_url {
        with_query_param(url, "sslrootcert", &path)
    } else {
        let quoted = path.replace('\\', "\\\\").replace('\'', "\\'");
        format!("{url} sslrootcert='{quoted}'")
    }))
}

/// The parameters of a Postgres connection string, where each is written in it: the query
/// of a URL, or every `key=value` of libpq's other form.
struct ConnParams<'a> {
    text: &'a str,
    is_url: bool,
    params: Vec<ConnParam>,
}

struct ConnParam {
    key: String,
    value: String,
    /// The bytes of `key=value` in the text.
    span: std::ops::Range<usize>,
}

impl<'a> ConnParams<'a> {
    fn parse(text: &'a str) -> Result<ConnParams<'a>> {
        let is_url = text.starts_with("postgres://") || text.starts_with("postgresql://");
        let params = if is_url {
            url_params(text)?
        } else {
            key_value_params(text)?
        };
        Ok(ConnParams {
            text,
            is_url,
            params,
        })
    }

    fn value(&self, key: &str) -> Option<String> {
        self.params
            .iter()
            .rev()
            .find(|p| p.key == key)
            .map(|p| p.value.clone())
    }

    /// The text without `sslrootcert`, and with `verify-ca`/`verify-full` as `require`.
    fn without_tls_words(&self) -> String {
        let rewritten = |p: &ConnParam| match (p.key.as_str(), p.value.as_str()) {
            ("sslrootcert", _) => None,
            ("sslmode", "verify-ca" | "verify-full") => Some("sslmode=require"),
            _ => Some(&self.text[p.span.clone()]),
        };
        if self.is_url {
            let base = self
                .text
                .split_once('?')
                .map_or(self.text, |(base, _)| base);
            let kept: Vec<&str> = self.params.iter().filter_map(rewritten).collect();
            if kept.is_empty() {
                return base.to_owned();
            }
            return format!("{base}?{}", kept.join("&"));
        }
        let mut out = String::with_capacity(self.text.len());
        let mut written = 0;
        for p in &self.params {
            out.push_str(&self.text[written..p.span.start]);
            out.push_str(rewritten(p).unwrap_or_default());
            written = p.span.end;
        }
        out.push_str(&self.text[written..]);
        out
    }
}

fn bad_url(message: &str) -> Error {
    Error::DatabaseUrl(message.to_owned())
}

fn decode(s: &str) -> Result<String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| bad_url("a query parameter is not UTF-8 once decoded"))
}

/// The `key=value` pairs of a URL's query (after `?`, separated by `&`).
fn url_params(text: &str) -> Result<Vec<ConnParam>> {
    let Some(query_start) = text.find('?').map(|i| i + 1) else {
        return Ok(Vec::new());
    };
    let mut params = Vec::new();
    let mut start = query_start;
    for pair in text[query_start..].split('&') {
        let span = start..start + pair.len();
        start = span.end + 1;
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad_url("a query parameter has no `=`"))?;
        params.push(ConnParam {
            key: decode(key)?,
            value: decode(value)?,
            span,
        });
    }
    Ok(params)
}

/// The `key = value` pairs of libpq's keyword form, values plain or in single quotes, `\`
/// escaping the next character (as tokio-postgres reads them).
fn key_value_params(text: &str) -> Result<Vec<ConnParam>> {
    let mut params = Vec::new();
    let mut chars = text.char_indices().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_spaces(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            return Ok(params);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        skip_spaces(&mut chars);
        if chars.next().map(|(_, c)| c) != Some('=') {
            return Err(bad_url("a parameter has no `=`"));
        }
        skip_spaces(&mut chars);
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut end = text.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| c)),
                '\'' if quoted => {
                    end = i + 1;
                    break;
                }
                c if !quoted && c.is_whitespace() => {
                    end = i;
                    break;
                }
                c => value.push(c),
            }
        }
        params.push(ConnParam {
            key,
            value,
            span: start..end,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(url: &str) -> (String, Option<PostgresTls>) {
        postgres_tls(url).unwrap()
    }

    #[test]
    fn a_postgres_url_without_tls_is_left_as_it_is() {
        for url in [
            "postgres://u:p@h:5432/db",
            "postgres://u:p@h/db?sslmode=disable&application_name=x",
            "postgres://u:p@h/db?sslmode=prefer",
            "host=h user=u sslmode=prefer",
        ] {
            assert_eq!(tls(url), (url.to_owned(), None), "{url}");
        }
    }

    #[test]
    fn verify_full_becomes_require_and_the_ca_file_is_taken_out() {
        let (url, asked) =
            tls("postgres://u:p@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&x=1");
        assert_eq!(url, "postgres://u:p@h/db?sslmode=require&x=1");
        assert_eq!(
            asked,
            Some(PostgresTls {
                check: Check::ChainAndName,
                trust: Trust::CaFile("/etc/ca.pem".into())
            })
        );
        let (url, asked) = tls("postgres://h/db?sslrootcert=/ca.pem&sslmode=verify-ca");
        assert_eq!(url, "postgres://h/db?sslmode=require");
        assert_eq!(asked.unwrap().check, Check::Chain);
        let (url, asked) = tls("postgres://h/db?sslmode=verify-full");
        assert_eq!(url, "postgres://h/db?sslmode=require");
        assert_eq!(asked.unwrap().trust, Trust::System);
        let (url, _) =
            tls("postgres://h/db?sslmode=require&sslrootcert=system&sslmode=verify-full");
        assert_eq!(url, "postgres://h/db?sslmode=require&sslmode=require");
    }

    #[test]
    fn the_keyword_form_is_read_as_libpq_writes_it() {
        let (url, asked) = tls("host=h sslrootcert = '/a dir/it\\'s.pem' sslmode=verify-ca user=u");
        assert_eq!(url, "host=h  sslmode=require user=u");
        assert_eq!(
            asked.unwrap().trust,
            Trust::CaFile("/a dir/it's.pem".into())
        );
        assert!(postgres_tls("host=h sslmode").is_err());
    }

    #[test]
    fn checking_only_the_chain_needs_a_ca_file() {
        for url in [
            "postgres://h/db?sslmode=require",
            "postgres://h/db?sslmode=verify-ca&sslrootcert=system",
        ] {
            let e = postgres_tls(url).unwrap_err().to_string();
            assert!(e.contains("GANTRY_TLS_CA_FILE"), "{e}");
        }
    }

    #[test]
    fn the_ca_file_is_written_into_urls_that_ask_for_tls_and_name_none() {
        let ca = Path::new("/etc/gantry/ca file.pem");
        assert_eq!(
            amqp_with_ca_file("amqps://u:p@h:5671/%2f", ca).unwrap(),
            "amqps://u:p@h:5671/%2f?cacertfile=/etc/gantry/ca%20file.pem"
        );
        assert_eq!(
            amqp_with_ca_file("amqps://h/v?heartbeat=5", ca).unwrap(),
            "amqps://h/v?heartbeat=5&cacertfile=/etc/gantry/ca%20file.pem"
        );
        assert_eq!(amqp_with_ca_file("amqp://h/v", ca), None);
        assert_eq!(amqp_with_ca_file("amqps://h/v?cacertfile=/x.pem", ca), None);

        let with = |url| postgres_with_ca_file(url, ca).unwrap();
        assert_eq!(
            with("postgres://h/db?sslmode=verify-full").unwrap(),
            "postgres://h/db?sslmode=verify-full&sslrootcert=/etc/gantry/ca%20file.pem"
        );
        assert_eq!(
            with("host=h sslmode=require").unwrap(),
            "host=h sslmode=require sslrootcert='/etc/gantry/ca file.pem'"
        );
        assert_eq!(with("postgres://h/db"), None);
        assert_eq!(
            with("postgres://h/db?sslmode=verify-ca&sslrootcert=/x"),
            None
        );

        let (_, asked) = tls(&with("host=h sslmode=require").unwrap());
        assert_eq!(asked.unwrap().trust, Trust::CaFile(ca.into()));
        let (_, asked) = tls(&with("postgres://h/db?sslmode=verify-ca").unwrap());
        assert_eq!(asked.unwrap().trust, Trust::CaFile(ca.into()));
    }

    #[test]
    fn a_ca_file_that_cannot_serve_says_which_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = read_ca_file(&missing).unwrap_err().to_string();
        assert!(
            e.contains("missing.pem") && e.contains("GANTRY_TLS_CA_FILE"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = read_ca_file(&empty).unwrap_err().to_string();
        assert!(e.contains("no certificate"), "{e}");
    }
}
