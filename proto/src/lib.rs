//! Every wire contract between Tandem's processes, in one crate so that both
//! ends of a connection compile against the same definition:
//! - [`weight_sync`]: `weight_sync.proto` (tonic/prost), the learner's push of
//!   new weights into a rollout server and its version query, with a client
//!   that chunks, streams and commits (bytes in, bytes out; the `candle`
//!   feature adds the dtype conversions);
//! - the OpenAI/vLLM-compatible JSON request and response types of the rollout
//!   server's HTTP API, with the RL extensions (`client_tag`,
//!   `return_token_ids`, `metadata.weight_version`) (issue 4).

pub mod weight_sync;

pub mod openai;
