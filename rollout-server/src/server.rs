//! The HTTP server: routes, shared state, the API-key guard on `/v1/*`, and
//! the small endpoints (`/health`, `/metrics`, `/version`, `/v1/models`).
//! The two generation endpoints live in [`crate::completions`] and
//! [`crate::chat`].

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use model::tokenizer::Tokenizer;
use proto::openai::{CLIENT_TAG_HEADER, ModelCard, ModelList, VersionInfo};
use serde::Serialize;

use crate::engine::EngineHandle;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::validation::Validator;

/// Request bodies up to this size (long token-id prompts in batches).
const MAX_BODY_BYTES: usize = 64 << 20;

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub validator: Validator,
    pub metrics: Arc<Metrics>,
    pub served_model_name: String,
    pub max_model_len: usize,
    pub api_key: Option<String>,
    /// Unix time the server started (model card `created`).
    pub started: u64,
}

pub type SharedState = Arc<AppState>;

/// Runs `f` (parsing and validating a request: tokenizing prompts, chat
/// templates, compiling a guided-decoding DFA) on tokio's blocking pool, so
/// that a big batch of prompts or a new JSON schema does not hold up the
/// streams served from this worker thread.
pub async fn blocking<T: Send + 'static>(
    state: &SharedState,
    f: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state))
        .await
        .map_err(|e| ApiError::Internal(format!("validating the request: {e}")))?
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh response id such as `cmpl-1a2b...`.
pub fn response_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{nanos:016x}{c:08x}")
}

/// The client tag of the `X-VLLM-Client-Tag` header, if any.
pub fn header_client_tag(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CLIENT_TAG_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

pub fn router(state: SharedState) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(crate::completions::handle))
        .route("/v1/chat/completions", post(crate::chat::handle))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        // Outside /v1, as in vLLM: the API key does not guard them.
        .route("/tokenize", post(crate::tokenize::tokenize))
        .route("/detokenize", post(crate::tokenize::detokenize))
        .merge(v1)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// 401 unless `Authorization: Bearer <key>` when the server has a key.
async fn require_api_key(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::Unauthorized(
                "missing or wrong API key: send `Authorization: Bearer <key>`".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(state): State<SharedState>) -> StatusCode {
    if state.engine.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metrics(State(state): State<SharedState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn version(State(state): State<SharedState>) -> axum::Json<VersionInfo> {
    axum::Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        weight_version: state.engine.weight_version(),
    })
}

async fn models(State(state): State<SharedState>) -> axum::Json<ModelList> {
    axum::Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: state.served_model_name.clone(),
            object: "model".into(),
            created: state.started,
            owned_by: "tandem".into(),
            root: state.served_model_name.clone(),
            parent: None,
            max_model_len: state.max_model_len,
        }],
    })
}

/// Server-sent events: each item is one `data:` JSON event, then an error
/// event if the stream failed, then `data: [DONE]`.
pub fn sse<S, T>(chunks: S) -> Response
where
    S: Stream<Item = Result<T, ApiError>> + Send + 'static,
    T: Serialize + Send + 'static,
{
    let events = async_stream::stream! {
        let mut chunks = std::pin::pin!(chunks);
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(c) => match serde_json::to_string(&c) {
                    Ok(json) => yield Ok::<_, Infallible>(Event::default().data(json)),
                    Err(e) => {
                        let err = ApiError::Internal(format!("cannot serialize a chunk: {e}"));
                        yield Ok(error_event(&err));
                        break;
                    }
                },
                Err(e) => {
                    yield Ok(error_event(&e));
                    break;
                }
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(events).into_response()
}

fn error_event(e: &ApiError) -> Event {
    Event::default().data(serde_json::to_string(&e.body()).unwrap_or_default())
}
