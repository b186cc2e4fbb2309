//! The connection to PostgreSQL, read from a connection URL the way libpq reads it, TLS
//! included: `sslmode` (`disable`, `allow`, `prefer` — the default —, `require`, `verify-ca`,
//! `verify-full`), `sslrootcert` (a CA file, or `system` for the system's roots), `sslcert`
//! and `sslkey`. As in libpq, `require` with an `sslrootcert` checks the chain like
//! `verify-ca`; `verify-ca` checks the chain only, `verify-full` the host name too.
//!
//! The worker's own connections speak TLS through rustls (tokio-postgres knows only disable,
//! prefer and require, and has no TLS of its own: the adapter at the end of this file hands it
//! a rustls stream). pg_dump and pg_restore get the same settings through their environment
//! (`PGSSLMODE`, `PGSSLROOTCERT`, …), and the password as `PGPASSWORD`: never on a command line.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "disable" => TlsMode::Disable,
            "allow" => TlsMode::Allow,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode `{other}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS parameters of a connection URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    pub root_cert: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// A connection URL, parsed.
pub struct Endpoint {
    config: Config,
    tls: TlsSettings,
}

impl Endpoint {
    /// Parses `url` (`postgres://…` or `key=value …`); the error does not repeat the URL,
    /// which may hold a password.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (rest, tls) = split_tls(url)?;
        let mut config: Config = rest.parse().map_err(|err| format!("{err}"))?;
        config.ssl_mode(match tls.mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Allow | TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        Ok(Endpoint { config, tls })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn password(&self) -> Option<String> {
        self.config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }

    /// Connects to `dbname` (None: the URL's database).
    pub async fn connect(&self, dbname: Option<&str>) -> Result<Client, ConnectError> {
        let mut config = self.config.clone();
        if let Some(dbname) = dbname {
            config.dbname(dbname);
        }
        let tls = RustlsConnect(Arc::new(
            client_config(&self.tls).map_err(ConnectError::Tls)?,
        ));
        let (client, connection) = config.connect(tls).await.map_err(ConnectError::Server)?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "postgres connection closed");
            }
        });
        Ok(client)
    }

    /// libpq environment for pg_dump and pg_restore connecting to `dbname`.
    pub fn tool_env(&self, dbname: &str) -> Vec<(&'static str, String)> {
        let config = &self.config;
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|host| match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
        let mut env = vec![
            ("PGDATABASE", dbname.to_string()),
            ("PGAPPNAME", "crm-backup".to_string()),
            ("PGCONNECT_TIMEOUT", "10".to_string()),
            ("PGSSLMODE", self.tls.mode.as_str().to_string()),
        ];
        if !hosts.is_empty() {
            env.push(("PGHOST", hosts.join(",")));
        }
        if !ports.is_empty() {
            env.push(("PGPORT", ports.join(",")));
        }
        if let Some(user) = config.get_user() {
            env.push(("PGUSER", user.to_string()));
        }
        if let Some(password) = self.password() {
            env.push(("PGPASSWORD", password));
        }
        if let Some(root) = &self.tls.root_cert {
            env.push(("PGSSLROOTCERT", root.clone()));
        }
        if let Some(cert) = &self.tls.cert {
            env.push(("PGSSLCERT", cert.display().to_string()));
        }
        if let Some(key) = &self.tls.key {
            env.push(("PGSSLKEY", key.display().to_string()));
        }
        env
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TLS settings cannot be used (a file missing or unreadable): no retry helps.
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Server(tokio_postgres::Error),
}

/// Takes the TLS parameters out of `url`; returns the rest for tokio-postgres.
fn split_tls(url: &str) -> Result<(String, TlsSettings), String> {
    let mut found: Vec<(String, String)> = Vec::new();
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|pair| !pair.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if TLS_KEYS.contains(&key) {
                        let value = percent_decode(value)
                            .ok_or_else(|| format!("the value of `{key}` is not valid UTF-8"))?;
                        found.push((key.to_string(), value));
                    } else {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        // key=value form: the TLS keys never need quoting (paths with spaces aside).
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            match token.split_once('=') {
                Some((key, value)) if TLS_KEYS.contains(&key) => {
                    found.push((key.to_string(), value.trim_matches('\'').to_string()));
                }
                _ => kept.push(token),
            }
        }
        kept.join(" ")
    };
    let mut tls = TlsSettings {
        mode: TlsMode::Prefer,
        root_cert: None,
        cert: None,
        key: None,
    };
    for (key, value) in found {
        match key.as_str() {
            "sslmode" => tls.mode = TlsMode::parse(&value)?,
            "sslrootcert" => tls.root_cert = Some(value),
            "sslcert" => tls.cert = Some(PathBuf::from(value)),
            _ => tls.key = Some(PathBuf::from(value)),
        }
    }
    if matches!(tls.mode, TlsMode::VerifyCa | TlsMode::VerifyFull) && tls.root_cert.is_none() {
        return Err(format!(
            "sslmode={} needs sslrootcert: the CA file that signed the server's certificate, \
             or `system` for the system's roots",
            tls.mode.as_str()
        ));
    }
    if tls.cert.is_some() != tls.key.is_some() {
        return Err("sslcert and sslkey go together".into());
    }
    Ok((rest, tls))
}

/// `%XX` escapes decoded (as libpq decodes URI parameters); None if they are malformed.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The rustls configuration for `tls`: what is checked follows the mode.
fn client_config(tls: &TlsSettings) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match (&tls.root_cert, tls.mode) {
        (Some(root), TlsMode::VerifyFull) => webpki_verifier(root, &provider)?,
        (Some(root), TlsMode::VerifyCa | TlsMode::Require) => {
            Arc::new(AnyHostName(webpki_verifier(root, &provider)?))
        }
        _ => Arc::new(AnyCertificate(provider)),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|err| format!("sslcert {}: {err}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|err| format!("sslkey {}: {err}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|err| format!("sslcert/sslkey: {err}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn webpki_verifier(
    root: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut roots = RootCertStore::empty();
    if root == "system" {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
    } else {
        let certs = CertificateDer::pem_file_iter(root)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|err| format!("sslrootcert {root}: {err}"))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|err| format!("sslrootcert {root}: {err}"))?;
        }
    }
    if roots.is_empty() {
        return Err(format!("sslrootcert {root}: no certificates"));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|err| format!("sslrootcert {root}: {err}"))
}

/// `prefer` and `require` without a root certificate: encrypted, the server not
/// authenticated (libpq's behaviour). The handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the root certificate; the name is not checked.
#[derive(Debug)]
struct AnyHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres's TLS hook, answered with rustls.
#[derive(Clone)]
struct RustlsConnect(Arc<ClientConfig>);

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnector;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnector, io::Error> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|err| io::Error::other(format!("host `{host}`: {err}")))?;
        Ok(RustlsConnector {
            connector: tokio_rustls::TlsConnector::from(self.0.clone()),
            name,
        })
    }
}

struct RustlsConnector {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(stream))
        })
    }
}

struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_read_like_libpq_and_kept_from_tokio_postgres() {
        let endpoint = Endpoint::parse(
            "postgres://crm:p%40ss@db.internal:6432/crm?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(endpoint.tls.mode, TlsMode::VerifyFull);
        assert_eq!(endpoint.tls.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(endpoint.config().get_ssl_mode(), SslMode::Require);
        assert_eq!(endpoint.config().get_application_name(), Some("x"));
        assert_eq!(endpoint.password().as_deref(), Some("p@ss"));
        let env = endpoint.tool_env("crm");
        assert!(env.contains(&("PGSSLMODE", "verify-full".to_string())));
        assert!(env.contains(&("PGSSLROOTCERT", "/etc/ca.pem".to_string())));

        let plain = Endpoint::parse("postgres://postgres@127.0.0.1:5432/postgres").unwrap();
        assert_eq!(plain.tls.mode, TlsMode::Prefer);
        let keywords = Endpoint::parse("host=db user=crm sslmode=require dbname=crm").unwrap();
        assert_eq!(keywords.tls.mode, TlsMode::Require);
        assert_eq!(keywords.config().get_dbname(), Some("crm"));

        for (url, problem) in [
            ("postgres://h/db?sslmode=verify-full", "needs sslrootcert"),
            ("postgres://h/db?sslmode=always", "not one of"),
            ("postgres://h/db?sslcert=/c.pem", "go together"),
        ] {
            let err = Endpoint::parse(url).err().unwrap();
            assert!(err.contains(problem), "{url}: {err}");
        }
    }
}
