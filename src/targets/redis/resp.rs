//! A minimal RESP2 client: commands, pipelines, and the raw replication stream of `SYNC`.
//!
//! The `redis` crate cannot consume a SYNC payload, and the target needs little else.

use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

/// One reply. Bulk strings stay bytes: keys and DUMP payloads are binary.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn into_result(self) -> Result<Reply, String> {
        match self {
            Reply::Error(message) => Err(message),
            other => Ok(other),
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Reply::Bulk(Some(bytes)) => Some(bytes),
            Reply::Status(text) => Some(text.as_bytes()),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            _ => None,
        }
    }
}

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

impl Stream for UnixStream {
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

pub struct Connection {
    stream: BufReader<Box<dyn Stream>>,
}

impl Connection {
    pub async fn tcp(host: &str, port: u16) -> io::Result<Self> {
        let stream = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            TcpStream::connect((host, port)),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream: BufReader::with_capacity(256 * 1024, Box::new(stream)),
        })
    }

    /// A TLS connection (Redis `tls-port`), verified against `tls`'s roots.
    pub async fn tls(host: &str, port: u16, tls: &TlsSettings) -> io::Result<Self> {
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            TcpStream::connect((host, port)),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TLS server name {host}: {err}"),
            )
        })?;
        let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
            .connect(name, tcp)
            .await?;
        Ok(Connection {
            stream: BufReader::with_capacity(256 * 1024, Box::new(stream)),
        })
    }

    pub async fn unix(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path).await?;
        Ok(Connection {
            stream: BufReader::with_capacity(256 * 1024, Box::new(stream)),
        })
    }

    /// `AUTH [user] password` when a password is set.
    pub async fn authenticate(
        &mut self,
        username: &str,
        password: &str,
    ) -> io::Result<Result<(), String>> {
        if password.is_empty() {
            return Ok(Ok(()));
        }
        let reply = if username.is_empty() {
            self.command(&[b"AUTH", password.as_bytes()]).await?
        } else {
            self.command(&[b"AUTH", username.as_bytes(), password.as_bytes()])
                .await?
        };
        Ok(reply.into_result().map(|_| ()))
    }

    /// Sends one command and reads its reply.
    pub async fn command(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        self.send(args).await?;
        self.stream.flush().await?;
        self.read_reply().await
    }

    /// Sends many commands, then reads all replies (one round trip).
    pub async fn pipeline(&mut self, commands: &[Vec<Vec<u8>>]) -> io::Result<Vec<Reply>> {
        for command in commands {
            let args: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
            self.send(&args).await?;
        }
        self.stream.flush().await?;
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(self.read_reply().await?);
        }
        Ok(replies)
    }

    /// Sends a command without reading a reply (for `SYNC`, whose answer is a stream).
    pub async fn send_only(&mut self, args: &[&[u8]]) -> io::Result<()> {
        self.send(args).await?;
        self.stream.flush().await
    }

    async fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        frame.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            frame.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            frame.extend_from_slice(arg);
            frame.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&frame).await
    }

    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        let n = self.stream.read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        Ok(line)
    }

    pub async fn read_reply(&mut self) -> io::Result<Reply> {
        let line = self.read_line().await?;
        let (kind, rest) = line
            .split_first()
            .ok_or_else(|| protocol("empty reply line"))?;
        let text = || String::from_utf8_lossy(rest).into_owned();
        let number = || -> io::Result<i64> {
            text()
                .parse()
                .map_err(|_| protocol(&format!("bad number `{}`", text())))
        };
        Ok(match kind {
            b'+' => Reply::Status(text()),
            b'-' => Reply::Error(text()),
            b':' => Reply::Int(number()?),
            b'$' => {
                let len = number()?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut data = vec![0u8; len as usize + 2];
                    self.stream.read_exact(&mut data).await?;
                    data.truncate(len as usize);
                    Reply::Bulk(Some(data))
                }
            }
            b'*' => {
                let len = number()?;
                if len < 0 {
                    Reply::Array(None)
                } else {
                    let mut items = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        items.push(Box::pin(self.read_reply()).await?);
                    }
                    Reply::Array(Some(items))
                }
            }
            other => {
                return Err(protocol(&format!(
                    "unexpected reply type `{}`",
                    *other as char
                )));
            }
        })
    }

    /// After `SYNC`: skips keep-alive newlines and reads the payload header,
    /// `$<len>` or `$EOF:<40-byte mark>` (diskless). An error reply is returned as `Err(message)`.
    pub async fn read_sync_header(&mut self) -> io::Result<Result<SyncPayload, String>> {
        loop {
            let line = self.read_line().await?;
            if line.is_empty() {
                continue; // keep-alive while the server prepares the snapshot
            }
            return Ok(match line[0] {
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

    /// The rest of the input (the RDB payload after the header), for blocking reads that
    /// fail after `timeout` without data; the connection cannot send any more. Dropping the
    /// [`Closer`] closes it, which ends a read in progress.
    pub fn into_reader(self, timeout: Duration) -> io::Result<(Box<dyn Read + Send>, Closer)> {
        let buffered = io::Cursor::new(self.stream.buffer().to_vec());
        let (rest, closer) = self.stream.into_inner().into_blocking(timeout)?;
        Ok((Box::new(Read::chain(buffered, rest)), closer))
    }
}

/// Client TLS configuration for Redis.
#[derive(Clone)]
pub struct TlsSettings {
    config: std::sync::Arc<rustls::ClientConfig>,
}

impl TlsSettings {
    /// Trusts the certificates of `ca_file` (PEM), or the system's roots when `None`.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, String> {
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

/// `INFO <section>` as key → value pairs.
pub fn parse_info(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}
