//! vLLM's `POST /tokenize` and `POST /detokenize`: the server's tokenizer and
//! chat template as a service, so that a client counts and builds prompts
//! exactly as generation will see them.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use proto::openai::{
    DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest,
    TokenizeResponse,
};
use serde_json::Value;

use crate::error::ApiError;
use crate::server::SharedState;
use crate::validation::parse_json;

pub async fn tokenize(State(state): State<SharedState>, body: Bytes) -> Response {
    into_response(run_tokenize(&state, &body))
}

pub async fn detokenize(State(state): State<SharedState>, body: Bytes) -> Response {
    into_response(
        parse_json::<DetokenizeRequest>(&body)
            .and_then(|req| state.validator.detokenize(&req))
            .map(|prompt| DetokenizeResponse { prompt }),
    )
}

fn into_response<T: serde::Serialize>(r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A body with `messages` is a chat request (as vLLM tells them apart);
/// any other needs `prompt`.
fn run_tokenize(state: &SharedState, body: &[u8]) -> Result<TokenizeResponse, ApiError> {
    let is_chat = matches!(
        serde_json::from_slice::<Value>(body),
        Ok(Value::Object(m)) if m.contains_key("messages")
    );
    let v = &state.validator;
    let (tokens, token_strs) = if is_chat {
        let req: TokenizeChatRequest = parse_json(body)?;
        (v.tokenize_chat(&req)?, req.return_token_strs)
    } else {
        let req: TokenizeCompletionRequest = parse_json(body)?;
        (v.tokenize_text(&req)?, req.return_token_strs)
    };
    Ok(TokenizeResponse {
        count: tokens.len(),
        max_model_len: v.max_model_len,
        token_strs: token_strs.unwrap_or(false).then(|| {
            tokens
                .iter()
                .map(|&id| v.tokenizer.id_to_token(id).unwrap_or_default())
                .collect()
        }),
        tokens,
    })
}
