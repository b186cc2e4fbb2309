//! An HTTP double of the Consul endpoints the Consul target uses, following Consul's
//! documented semantics (Consul itself cannot be installed on the test machines):
//! - `GET /v1/kv/<prefix>?recurse`: JSON array of `{Key, Flags, Value (base64 | null),
//!   CreateIndex, ModifyIndex, LockIndex}`, `X-Consul-Index` header, 404 when empty;
//! - `GET /v1/kv/<prefix>?keys`: JSON array of key names, 404 when empty;
//! - `PUT /v1/txn`: at most 64 operations and a 512 KiB body (`txn_max_req_len`; more → 413),
//!   `set`/`delete` KV verbs, atomic;
//! - `PUT /v1/kv/<key>?flags=N`: raw value of at most 512 KiB (`kv_max_value_size`);
//! - `GET /v1/snapshot` (gzip body, `X-Consul-Index`), `PUT /v1/snapshot`;
//! - `GET /v1/status/leader`;
//! - ACLs: a missing or wrong `X-Consul-Token` → 403 "Permission denied"; the snapshot
//!   needs the management token.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

#[derive(Default)]
pub struct ConsulState {
    pub kv: BTreeMap<String, (u64, Vec<u8>)>,
    pub index: u64,
    pub snapshot: Vec<u8>,
    pub restored_snapshot: Option<Vec<u8>>,
    /// Token needed for KV (None: no ACLs).
    pub kv_token: Option<String>,
    /// Token needed for snapshots.
    pub management_token: Option<String>,
    /// Status codes to answer the next requests with, before behaving.
    pub failures: VecDeque<u16>,
    /// Operations per transaction received.
    pub txn_sizes: Vec<usize>,
    pub requests: u64,
}

#[derive(Clone)]
pub struct ConsulDouble {
    pub state: Arc<Mutex<ConsulState>>,
    pub address: String,
}

impl ConsulDouble {
    pub async fn start(state: ConsulState) -> Self {
        let state = Arc::new(Mutex::new(state));
        let app = Router::new()
            .route("/v1/status/leader", get(leader))
            .route("/v1/snapshot", any(snapshot))
            .route("/v1/txn", any(txn))
            .route("/v1/kv/", get(kv))
            .route("/v1/kv/{*prefix}", get(kv).put(put_key))
            .layer(axum::extract::DefaultBodyLimit::max(8 << 20))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        ConsulDouble { state, address }
    }

    pub fn set(&self, key: &str, flags: u64, value: &[u8]) {
        let mut state = self.state.lock().unwrap();
        state.index += 1;
        state.kv.insert(key.to_string(), (flags, value.to_vec()));
    }
}

type Shared = State<Arc<Mutex<ConsulState>>>;

/// Failure injection and ACL checks shared by every endpoint.
fn gate(state: &mut ConsulState, headers: &HeaderMap, management: bool) -> Option<Response> {
    state.requests += 1;
    if let Some(code) = state.failures.pop_front() {
        return Some((StatusCode::from_u16(code).unwrap(), "injected failure").into_response());
    }
    let required = if management {
        state.management_token.as_ref().or(state.kv_token.as_ref())
    } else {
        state.kv_token.as_ref()
    };
    let given = headers.get("X-Consul-Token").and_then(|v| v.to_str().ok());
    match required {
        Some(token) if given != Some(token.as_str()) => {
            Some((StatusCode::FORBIDDEN, "Permission denied").into_response())
        }
        _ => None,
    }
}

fn with_index(index: u64, response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    response
        .headers_mut()
        .insert("X-Consul-Index", index.to_string().parse().unwrap());
    response
}

async fn leader(State(state): Shared, headers: HeaderMap) -> Response {
    let mut state = state.lock().unwrap();
    if let Some(denied) = gate(&mut state, &headers, false) {
        return denied;
    }
    "\"127.0.0.1:8300\"".into_response()
}

async fn kv(
    State(state): Shared,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let mut state = state.lock().unwrap();
    if let Some(denied) = gate(&mut state, &headers, false) {
        return denied;
    }
    let prefix = uri.path().trim_start_matches("/v1/kv/").to_string();
    let prefix = percent_decode(&prefix);
    let matching: Vec<(&String, &(u64, Vec<u8>))> = state
        .kv
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .collect();
    if matching.is_empty() {
        return with_index(state.index, StatusCode::NOT_FOUND);
    }
    if query.contains_key("keys") {
        let keys: Vec<&String> = matching.iter().map(|(k, _)| *k).collect();
        return with_index(state.index, axum::Json(keys));
    }
    if !query.contains_key("recurse") {
        return (
            StatusCode::BAD_REQUEST,
            "the double only serves ?recurse and ?keys",
        )
            .into_response();
    }
    let body: Vec<serde_json::Value> = matching
        .iter()
        .map(|(key, (flags, value))| {
            serde_json::json!({
                "LockIndex": 0, "Key": key, "Flags": flags,
                "Value": if value.is_empty() { serde_json::Value::Null } else { BASE64.encode(value).into() },
                "CreateIndex": 1, "ModifyIndex": state.index,
            })
        })
        .collect();
    with_index(state.index, axum::Json(body))
}

async fn txn(State(state): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let mut state = state.lock().unwrap();
    if let Some(denied) = gate(&mut state, &headers, false) {
        return denied;
    }
    let ops: Vec<serde_json::Value> = match serde_json::from_slice(&body) {
        Ok(ops) => ops,
        Err(err) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("Failed to parse body: {err}"),
            )
                .into_response();
        }
    };
    state.txn_sizes.push(ops.len());
    if body.len() > MAX_REQUEST {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "Request body too large, max size: 524288 bytes",
        )
            .into_response();
    }
    if ops.len() > 64 {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Transaction contains too many operations ({} > 64)",
                ops.len()
            ),
        )
            .into_response();
    }
    let mut next = state.kv.clone();
    for op in &ops {
        let kv = &op["KV"];
        let key = kv["Key"].as_str().unwrap_or_default().to_string();
        match kv["Verb"].as_str() {
            Some("set") => {
                let value = match kv["Value"].as_str() {
                    Some(b64) => match BASE64.decode(b64) {
                        Ok(v) => v,
                        Err(_) => return (StatusCode::BAD_REQUEST, "bad base64").into_response(),
                    },
                    None => Vec::new(),
                };
                next.insert(key, (kv["Flags"].as_u64().unwrap_or(0), value));
            }
            Some("delete") => {
                next.remove(&key);
            }
            other => {
                return (StatusCode::CONFLICT, format!("unsupported verb {other:?}"))
                    .into_response();
            }
        }
    }
    state.kv = next;
    state.index += 1;
    with_index(
        state.index,
        axum::Json(serde_json::json!({"Results": [], "Errors": null})),
    )
}

/// Consul's default `kv_max_value_size` and `txn_max_req_len`.
const MAX_REQUEST: usize = 512 * 1024;

async fn put_key(
    State(state): Shared,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let mut state = state.lock().unwrap();
    if let Some(denied) = gate(&mut state, &headers, false) {
        return denied;
    }
    if body.len() > MAX_REQUEST {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "Value exceeds 524288 byte limit",
        )
            .into_response();
    }
    let key = percent_decode(uri.path().trim_start_matches("/v1/kv/"));
    let flags = query.get("flags").and_then(|f| f.parse().ok()).unwrap_or(0);
    state.index += 1;
    state.kv.insert(key, (flags, body.to_vec()));
    axum::Json(true).into_response()
}

async fn snapshot(
    State(state): Shared,
    headers: HeaderMap,
    method: axum::http::Method,
    body: Bytes,
) -> Response {
    let mut state = state.lock().unwrap();
    if let Some(denied) = gate(&mut state, &headers, true) {
        return denied;
    }
    match method {
        axum::http::Method::GET => with_index(state.index, state.snapshot.clone()),
        axum::http::Method::PUT => {
            state.restored_snapshot = Some(body.to_vec());
            StatusCode::OK.into_response()
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}
