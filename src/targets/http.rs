//! HTTP for targets that speak to an API (RabbitMQ management, Consul): timeouts, retries
//! of transient failures, and errors that say whether another try can help.

use std::sync::OnceLock;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use super::TargetError;
use crate::model::TargetKind;
use crate::telemetry::redact_url;

/// Attempts of one request when the server answers 5xx or the connection fails.
const ATTEMPTS: u32 = 4;
/// What is read of an error answer's body: its start names the problem.
const ERROR_BODY_BYTES: usize = 64 * 1024;

/// One HTTP client for the process: building one reads the system's root certificates (a
/// few milliseconds of CPU, every step), and a shared one keeps its connections alive from
/// step to step. Credentials go per request, never into the client.
fn shared_client() -> &'static Result<reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            // A token or password (X-Consul-Token is not one of the headers reqwest drops on
            // its own) must not follow a redirect to another host: such a redirect is refused.
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                let same_host = attempt.previous().first().is_some_and(|first| {
                    first.host_str() == attempt.url().host_str()
                        && first.port_or_known_default() == attempt.url().port_or_known_default()
                });
                if same_host && attempt.previous().len() < 5 {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            }))
            .build()
            .map_err(|err| err.to_string())
    })
}

#[derive(Clone)]
pub struct ApiClient {
    client: reqwest::Client,
    base: String,
    target: TargetKind,
    /// Secrets that must not reach an error message (tokens, passwords).
    secrets: Vec<String>,
}

impl ApiClient {
    pub fn new(target: TargetKind, base: &str, secrets: Vec<String>) -> Result<Self, TargetError> {
        let client = shared_client()
            .clone()
            .map_err(|err| TargetError::Unusable(format!("HTTP client: {err}")))?;
        Ok(ApiClient {
            client,
            base: base.trim_end_matches('/').to_string(),
            target,
            secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    /// Sends the request built by `build`, retrying connection failures and 5xx answers
    /// with a growing pause; returns the first answer that is not one of those.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, TargetError> {
        let url = self.url(path);
        let attempt = || async {
            match build(self.client.request(method.clone(), &url))
                .send()
                .await
            {
                Ok(response) if response.status().is_server_error() => Err(Failed::Transient(
                    format!("{} answered {}", self.shown(&url), response.status()),
                )),
                Ok(response) => Ok(response),
                Err(err) if err.is_builder() => Err(Failed::Request(
                    self.scrub(&format!("cannot request {}: {err}", self.shown(&url))),
                )),
                Err(err) => Err(Failed::Transient(
                    self.scrub(&format!("{}: {err}", self.shown(&url))),
                )),
            }
        };
        let pauses = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_times(ATTEMPTS as usize - 1);
        attempt
            .retry(pauses)
            .when(|failed| matches!(failed, Failed::Transient(_)))
            .notify(|failed, pause| {
                tracing::debug!(target = %self.target, error = %failed.message(), ?pause, "retrying")
            })
            .await
            .map_err(|failed| match failed {
                Failed::Request(message) => TargetError::InvalidOptions {
                    target: self.target,
                    message,
                },
                Failed::Transient(last) => TargetError::Unreachable {
                    target: self.target,
                    message: format!("{last} (after {ATTEMPTS} attempts)"),
                },
            })
    }

    /// The body of `response`, at most `max` bytes: a longer one, as declared or as it
    /// arrives, is an error naming the limit, and nothing past the limit is held.
    pub async fn body(
        &self,
        mut response: Response,
        max: usize,
        what: &str,
    ) -> Result<bytes::Bytes, TargetError> {
        let too_large = || {
            TargetError::Unusable(format!(
                "{what}: the answer is larger than the {max} bytes it may be"
            ))
        };
        if response.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        let mut body = bytes::BytesMut::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) if body.len() + chunk.len() > max => return Err(too_large()),
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => return Ok(body.freeze()),
                Err(err) => {
                    return Err(TargetError::Unreachable {
                        target: self.target,
                        message: format!("{what}: reading the answer: {err}"),
                    });
                }
            }
        }
    }

    /// Turns a non-success answer into an error naming the request.
    pub async fn expect_success(
        &self,
        response: Response,
        what: &str,
    ) -> Result<Response, TargetError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = self.error_text(response).await;
        let message = format!("{what}: HTTP {status}: {body}");
        Err(match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => {
                TargetError::Unreachable {
                    target: self.target,
                    message,
                }
            }
            _ => TargetError::Tool {
                tool: format!("{} API", self.target),
                message,
                retryable: false,
            },
        })
    }

    fn shown(&self, url: &str) -> String {
        redact_url(url)
    }

    /// The start of an error answer's body, for a message: its first [`ERROR_BODY_BYTES`]
    /// read (the rest is not), the configured secrets scrubbed, at most 300 characters.
    pub async fn error_text(&self, response: Response) -> String {
        let body = body_prefix(response, ERROR_BODY_BYTES).await;
        self.scrub(&body).trim().chars().take(300).collect()
    }

    fn scrub(&self, text: &str) -> String {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        crate::telemetry::scrub(text, &secrets)
    }
}

/// Why one attempt of a request failed.
enum Failed {
    /// The request itself cannot be built: trying again cannot help.
    Request(String),
    /// A connection failure or a 5xx answer.
    Transient(String),
}

impl Failed {
    fn message(&self) -> &str {
        match self {
            Failed::Request(message) | Failed::Transient(message) => message,
        }
    }
}

/// The first `max` bytes of an answer's body as text (lossy); the rest is not read.
async fn body_prefix(mut response: Response, max: usize) -> String {
    let mut body = Vec::new();
    while body.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(max - body.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}
