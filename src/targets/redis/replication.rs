//! The replica side of Redis's replication handshake, hand-framed: `AUTH`, `REPLCONF`,
//! `SYNC`, then the RDB payload as a blocking reader (the `redis` crate cannot consume a
//! `SYNC` stream). Only one-line replies are read here (`+OK`, `-ERR …`); a line longer
//! than [`MAX_LINE`] is a protocol error, never an allocation the server chose.

use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{Address, Endpoint, KIND, lost};
use crate::targets::TargetError;

/// Longest reply line read during the handshake.
const MAX_LINE: u64 = 64 * 1024;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The connection for blocking reads on a thread of its own, each failing after
    /// `timeout` without data. A plain socket leaves the runtime's `epoll`, which wakes
    /// its watcher for every segment that arrives; TLS stays async, read by blocking on it.
    fn into_blocking(
        self: Box<Self>,
        timeout: Duration,
    ) -> io::Result<(Box<dyn Read + Send>, Closer)>;
}

impl Stream for TcpStream {
    fn into_blocking(
        self: Box<Self>,
        timeout: Duration,
    ) -> io::Result<(Box<dyn Read + Send>, Closer)> {
        let socket = self.into_std()?;
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(timeout))?;
        let handle = socket.try_clone()?;
        let closer = Closer::new(move || {
            let _ = handle.shutdown(std::net::Shutdown::Both);
        });
        Ok((Box::new(socket), closer))
    }
}

impl Stream for tokio_rustls::client::TlsStream<TcpStream> {
    fn into_blocking(
        self: Box<Self>,
        timeout: Duration,
    ) -> io::Result<(Box<dyn Read + Send>, Closer)> {
        let closed = tokio_util::sync::CancellationToken::new();
        let reader = BlockOn {
            stream: self,
            runtime: tokio::runtime::Handle::current(),
            timeout,
            closed: closed.clone(),
        };
        Ok((Box::new(reader), Closer::new(move || closed.cancel())))
    }
}

/// Closes a connection handed to a blocking reader when dropped, so that the reader's
/// thread stops at once instead of at its read timeout.
pub struct Closer(Option<Box<dyn FnOnce() + Send>>);

impl Closer {
    fn new(close: impl FnOnce() + Send + 'static) -> Self {
        Closer(Some(Box::new(close)))
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        if let Some(close) = self.0.take() {
            close();
        }
    }
}

/// Blocking reads of an async stream, for a thread outside the runtime.
struct BlockOn<S> {
    stream: S,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    closed: tokio_util::sync::CancellationToken,
}

impl<S: AsyncRead + Unpin> Read for BlockOn<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (stream, closed, timeout) = (&mut self.stream, &self.closed, self.timeout);
        self.runtime.block_on(async move {
            tokio::select! {
                read = tokio::time::timeout(timeout, stream.read(buf)) => read
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no data from Redis"))?,
                _ = closed.cancelled() => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the connection was closed",
                )),
            }
        })
    }
}

/// A connection that becomes a replica to take the server's RDB.
pub(super) struct Replica {
    stream: BufReader<Box<dyn Stream>>,
}

impl Replica {
    /// Connects to `endpoint` (TCP, optionally TLS) and authenticates.
    pub(super) async fn connect(endpoint: &Endpoint) -> Result<Self, TargetError> {
        let Address::Tcp { host, port, tls } = &endpoint.address else {
            return Err(TargetError::Unusable(
                "replication needs a TCP address".into(),
            ));
        };
        let connected = async {
            let tcp = tokio::time::timeout(
                super::CONNECT_TIMEOUT,
                TcpStream::connect((host.as_str(), *port)),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            tcp.set_nodelay(true)?;
            if !*tls {
                return Ok(Box::new(tcp) as Box<dyn Stream>);
            }
            let settings = TlsSettings::new(endpoint.tls_ca_file.as_deref())
                .map_err(|message| io::Error::new(io::ErrorKind::InvalidInput, message))?;
            let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|err| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("TLS server name {host}: {err}"),
                )
            })?;
            let stream = tokio_rustls::TlsConnector::from(settings.config)
                .connect(name, tcp)
                .await?;
            Ok(Box::new(stream) as Box<dyn Stream>)
        }
        .await;
        let stream = connected.map_err(|err: io::Error| {
            let message = format!("{}: {err}", endpoint.shown());
            // A certificate that does not verify will not verify on the next try either.
            if matches!(
                err.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput
            ) {
                TargetError::Tool {
                    tool: "redis TLS".into(),
                    message,
                    retryable: false,
                }
            } else {
                TargetError::Unreachable {
                    target: KIND,
                    message,
                }
            }
        })?;
        let mut replica = Replica {
            stream: BufReader::with_capacity(256 * 1024, stream),
        };
        if !endpoint.password.is_empty() {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if !endpoint.username.is_empty() {
                auth.push(endpoint.username.as_bytes());
            }
            auth.push(endpoint.password.as_bytes());
            if let Err(message) = replica.command(&auth).await.map_err(lost)? {
                return Err(TargetError::Tool {
                    tool: "redis".into(),
                    message: format!("authentication failed: {message}"),
                    retryable: false,
                });
            }
        }
        Ok(replica)
    }

    /// Asks for the RDB: `Ok(Err(reason))` when the server refuses `SYNC`; otherwise the
    /// payload's framing, a blocking reader of the rest of the stream (each read failing
    /// after `timeout` without data) and the [`Closer`] that ends it.
    pub(super) async fn sync(
        mut self,
        timeout: Duration,
    ) -> Result<Result<(SyncPayload, Box<dyn Read + Send>, Closer), String>, TargetError> {
        // Older servers reject these; the stream then comes in the `$<len>` form.
        let _ = self
            .command(&[b"REPLCONF", b"capa", b"eof"])
            .await
            .map_err(lost)?;
        let _ = self
            .command(&[b"REPLCONF", b"rdb-only", b"1"])
            .await
            .map_err(lost)?;
        self.send(&[b"SYNC"]).await.map_err(lost)?;
        let header = tokio::time::timeout(timeout, self.read_sync_header())
            .await
            .map_err(|_| {
                lost(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer to SYNC within {} seconds", timeout.as_secs()),
                ))
            })?
            .map_err(lost)?;
        let payload = match header {
            Ok(payload) => payload,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let buffered = io::Cursor::new(self.stream.buffer().to_vec());
        let (rest, closer) = self
            .stream
            .into_inner()
            .into_blocking(timeout)
            .map_err(lost)?;
        Ok(Ok((payload, Box::new(Read::chain(buffered, rest)), closer)))
    }

    /// Sends one command and reads its one-line reply: `Err` holds an error reply's text.
    async fn command(&mut self, args: &[&[u8]]) -> io::Result<Result<String, String>> {
        self.send(args).await?;
        let line = self.read_line().await?;
        let text = String::from_utf8_lossy(line.get(1..).unwrap_or_default()).into_owned();
        match line.first() {
            Some(b'+' | b':') => Ok(Ok(text)),
            Some(b'-') => Ok(Err(text)),
            _ => Err(protocol("expected a one-line reply")),
        }
    }

    async fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        frame.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            frame.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            frame.extend_from_slice(arg);
            frame.extend_from_slice(b"\r\n");
        }
        let stream = self.stream.get_mut();
        stream.write_all(&frame).await?;
        stream.flush().await
    }

    /// One line without its `\r\n`, at most [`MAX_LINE`] bytes.
    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        let n = (&mut self.stream)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        if !line.ends_with(b"\n") {
            return Err(protocol(&format!(
                "a reply line longer than {MAX_LINE} bytes"
            )));
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        Ok(line)
    }

    /// After `SYNC`: skips keep-alive newlines and reads the payload header, `$<len>` or
    /// `$EOF:<40-byte mark>` (diskless). An error reply is returned as `Err(message)`.
    async fn read_sync_header(&mut self) -> io::Result<Result<SyncPayload, String>> {
        loop {
            let line = self.read_line().await?;
            let Some(&kind) = line.first() else {
                continue; // keep-alive while the server prepares the snapshot
            };
            return Ok(match kind {
                b'-' => Err(String::from_utf8_lossy(&line[1..]).into_owned()),
                b'$' if line.starts_with(b"$EOF:") => {
                    let mark = line[5..].to_vec();
                    if mark.len() != 40 {
                        return Err(protocol("EOF mark is not 40 bytes"));
                    }
                    Ok(SyncPayload::UntilMark(mark))
                }
                b'$' => {
                    let len: u64 = String::from_utf8_lossy(&line[1..])
                        .parse()
                        .map_err(|_| protocol("bad payload length"))?;
                    Ok(SyncPayload::Length(len))
                }
                b'+' => continue, // e.g. +FULLRESYNC on servers that answer SYNC like PSYNC
                _ => return Err(protocol("unexpected line before the RDB payload")),
            });
        }
    }
}

/// Client TLS configuration for Redis.
#[derive(Clone)]
struct TlsSettings {
    config: std::sync::Arc<rustls::ClientConfig>,
}

impl TlsSettings {
    /// Trusts the certificates of `ca_file` (PEM), or the system's roots when `None`.
    fn new(ca_file: Option<&Path>) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .map_err(|err| format!("{}: {err}", path.display()))?
                {
                    let cert = cert.map_err(|err| format!("{}: {err}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|err| format!("{}: {err}", path.display()))?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err("no trusted certificates to verify Redis's TLS certificate".into());
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsSettings {
            config: std::sync::Arc::new(config),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SyncPayload {
    Length(u64),
    UntilMark(Vec<u8>),
}

fn protocol(message: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("Redis protocol: {message}"),
    )
}
