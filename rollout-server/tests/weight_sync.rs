//! Weight sync over a real tonic server on a free loopback port, pushed to by
//! the real client (`proto::weight_sync`), into an in-process sink that holds
//! the tiny preset's weights; and end to end, into the real `rollout-server`
//! binary, whose greedy completions and `metadata.weight_version` change.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use model::Weights;
use model::presets::{self, Preset};
use proto::weight_sync::{
    Bytes, Client, Commit, PushResult, TensorBytes, TensorChunk, WeightChunk, WeightSyncError,
    WireDType, get_version, push_weights,
};
use rollout_server::weight_sync::{TensorSpec, WeightSink, WeightSyncConfig, serve_with};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(30);

/// A real sink: the tiny model's weights behind a mutex.
struct TestSink {
    spec: BTreeMap<String, TensorSpec>,
    state: Mutex<(Weights, u64)>,
}

impl TestSink {
    fn new(weights: Weights) -> Self {
        let spec = weights
            .iter()
            .map(|(name, t)| {
                let spec = TensorSpec {
                    shape: t.dims().to_vec(),
                    dtype: t.dtype(),
                };
                (name.clone(), spec)
            })
            .collect();
        Self {
            spec,
            state: Mutex::new((weights, 0)),
        }
    }

    fn weights(&self) -> Weights {
        self.state.lock().unwrap().0.clone()
    }
}

#[tonic::async_trait]
impl WeightSink for TestSink {
    fn spec(&self) -> &BTreeMap<String, TensorSpec> {
        &self.spec
    }
    fn version(&self) -> u64 {
        self.state.lock().unwrap().1
    }
    async fn apply(&self, tensors: Vec<(String, Tensor)>, version: u64) -> Result<(), String> {
        let mut state = self.state.lock().unwrap();
        for (name, tensor) in tensors {
            state.0.insert(name, tensor);
        }
        state.1 = version;
        Ok(())
    }
}

/// The tiny preset's random weights for `seed` (made once per seed).
fn tiny_weights(seed: u64) -> Weights {
    static CACHE: OnceLock<Mutex<BTreeMap<u64, Weights>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap();
    cache
        .entry(seed)
        .or_insert_with(|| {
            let cfg = presets::config(Preset::Tiny, 100, 1, 0).unwrap();
            Weights::random(&cfg, seed, &Device::Cpu, DType::F32).unwrap()
        })
        .clone()
}

struct Server {
    sink: Arc<TestSink>,
    endpoint: String,
    _stop: oneshot::Sender<()>,
}

async fn start_with(config: WeightSyncConfig) -> Server {
    start_on(tiny_weights(1), config).await
}

async fn start_on(weights: Weights, config: WeightSyncConfig) -> Server {
    let sink = Arc::new(TestSink::new(weights));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let dyn_sink: Arc<dyn WeightSink> = sink.clone();
    tokio::spawn(serve_with(listener, dyn_sink, config, async {
        let _ = stopped.await;
    }));
    Server {
        sink,
        endpoint,
        _stop: stop,
    }
}

async fn start() -> Server {
    start_with(WeightSyncConfig {
        model_name: "tiny".into(),
        ..WeightSyncConfig::default()
    })
    .await
}

fn f32_bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn snapshot(w: &Weights) -> BTreeMap<String, Vec<u32>> {
    w.iter().map(|(n, t)| (n.clone(), f32_bits(t))).collect()
}

fn tensor_bytes(w: &Weights, name: &str) -> TensorBytes {
    let t = w.get(name).unwrap();
    let data: Vec<u8> = t
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .flat_map(f32::to_le_bytes)
        .collect();
    TensorBytes::new(name, WireDType::F32, t.dims().to_vec(), data)
}

fn all_tensor_bytes(w: &Weights) -> Vec<TensorBytes> {
    w.names().map(|n| tensor_bytes(w, n)).collect()
}

/// The messages of a whole push, commit last.
fn messages(tensors: &[TensorBytes], chunk_bytes: usize, version: u64) -> Vec<WeightChunk> {
    let chunks: Vec<TensorChunk> = tensors.iter().flat_map(|t| t.chunks(chunk_bytes)).collect();
    commit_after(chunks, tensors.len() as u64, version)
}

fn commit_after(chunks: Vec<TensorChunk>, num_tensors: u64, version: u64) -> Vec<WeightChunk> {
    let mut checksum = proto::weight_sync::Checksum::new();
    let mut total = 0;
    for c in &chunks {
        checksum.update(&c.data);
        total += c.data.len() as u64;
    }
    let mut out: Vec<WeightChunk> = chunks.into_iter().map(WeightChunk::tensor).collect();
    out.push(WeightChunk::commit(Commit {
        version,
        checksum: checksum.digest(),
        num_tensors,
        total_bytes: total,
    }));
    out
}

async fn client(server: &Server) -> Client {
    Client::connect(&server.endpoint, None, DEADLINE)
        .await
        .unwrap()
}

/// Sends hand-made messages as one push.
async fn push_raw(
    server: &Server,
    messages: Vec<WeightChunk>,
) -> Result<PushResult, tonic::Status> {
    let mut raw = client(server).await.raw();
    raw.push_weights(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

fn assert_status(result: Result<PushResult, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the push should be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} should mention {needle:?}",
        status.message()
    );
}

fn assert_code(result: Result<PushResult, WeightSyncError>, code: Code, needle: &str) {
    let err = result.expect_err("the push should be refused");
    assert_eq!(err.code(), Some(code), "{err}");
    assert!(
        err.to_string().contains(needle),
        "{err} should mention {needle:?}"
    );
}

/// The sink still holds the seed-1 weights at version 0.
fn assert_unchanged(server: &Server) {
    assert_eq!(server.sink.version(), 0);
    assert_eq!(snapshot(&server.sink.weights()), snapshot(&tiny_weights(1)));
}

const EMBED: &str = "model.embed_tokens.weight";
const Q_PROJ: &str = "model.layers.0.self_attn.q_proj.weight";
const K_PROJ: &str = "model.layers.0.self_attn.k_proj.weight";

#[tokio::test]
async fn full_push_changes_every_tensor_and_the_version() {
    let server = start().await;
    let new = tiny_weights(2);
    let result = push_weights(&server.endpoint, all_tensor_bytes(&new), 1, None, DEADLINE)
        .await
        .unwrap();
    assert_eq!(result.version, 1);
    assert_eq!(result.tensors_updated, new.len() as u64);
    let expected_bytes: usize = new.iter().map(|(_, t)| t.elem_count() * 4).sum();
    assert_eq!(result.bytes, expected_bytes as u64);
    assert_eq!(server.sink.version(), 1);
    let got = snapshot(&server.sink.weights());
    let old = snapshot(&tiny_weights(1));
    assert_eq!(got, snapshot(&new));
    for (name, bits) in &got {
        // Norms are ones and biases zeros in every random init.
        if !name.ends_with("norm.weight") && !name.ends_with(".bias") {
            assert_ne!(bits, &old[name], "{name} did not change");
        }
    }
}

#[tokio::test]
async fn partial_push_changes_only_those_tensors() {
    let server = start().await;
    let new = tiny_weights(2);
    let pushed = [EMBED, Q_PROJ];
    let result = client(&server)
        .await
        .push(pushed.iter().map(|n| tensor_bytes(&new, n)), 5, DEADLINE)
        .await
        .unwrap();
    assert_eq!((result.version, result.tensors_updated), (5, 2));
    assert_eq!(server.sink.version(), 5);
    let got = snapshot(&server.sink.weights());
    let (old, new) = (snapshot(&tiny_weights(1)), snapshot(&new));
    for (name, bits) in &got {
        let want = if pushed.contains(&name.as_str()) {
            &new
        } else {
            &old
        };
        assert_eq!(bits, &want[name], "{name}");
    }
}

#[tokio::test]
async fn several_chunks_per_tensor_round_trip_bit_exact() {
    let server = start().await;
    let new = tiny_weights(3);
    let embed = tensor_bytes(&new, EMBED);
    assert!(
        embed.data.len() > 30 * 1000,
        "the embedding spans many chunks"
    );
    let client = client(&server).await.with_chunk_bytes(1000);
    client.push([embed.clone()], 1, DEADLINE).await.unwrap();
    assert_eq!(
        f32_bits(server.sink.weights().get(EMBED).unwrap()),
        snapshot(&new)[EMBED]
    );

    // Chunks may come in any order.
    let mut chunks: Vec<TensorChunk> = tensor_bytes(&tiny_weights(4), EMBED).chunks(777).collect();
    chunks.reverse();
    push_raw(&server, commit_after(chunks, 1, 2)).await.unwrap();
    assert_eq!(
        f32_bits(server.sink.weights().get(EMBED).unwrap()),
        snapshot(&tiny_weights(4))[EMBED]
    );
}

#[tokio::test]
async fn bf16_on_the_wire_is_converted_to_the_model_dtype() {
    let server = start().await;
    let new = tiny_weights(2)
        .get(Q_PROJ)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let data: Vec<u8> = new
        .flatten_all()
        .unwrap()
        .to_vec1::<half::bf16>()
        .unwrap()
        .into_iter()
        .flat_map(half::bf16::to_le_bytes)
        .collect();
    let tensor = TensorBytes::new(Q_PROJ, WireDType::BF16, new.dims().to_vec(), data);
    client(&server)
        .await
        .push([tensor], 1, DEADLINE)
        .await
        .unwrap();
    let got = server.sink.weights().get(Q_PROJ).unwrap().clone();
    assert_eq!(got.dtype(), DType::F32);
    assert_eq!(f32_bits(&got), f32_bits(&new.to_dtype(DType::F32).unwrap()));
}

#[tokio::test]
async fn stream_ended_before_the_commit_changes_nothing() {
    let server = start().await;
    let mut msgs = messages(&all_tensor_bytes(&tiny_weights(2)), 4096, 1);
    msgs.pop(); // no commit
    assert_status(
        push_raw(&server, msgs).await,
        Code::Aborted,
        "without a commit",
    );
    assert_unchanged(&server);
    // The push lock was released: the next push goes through.
    push_weights(
        &server.endpoint,
        all_tensor_bytes(&tiny_weights(2)),
        1,
        None,
        DEADLINE,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn client_cut_mid_push_changes_nothing() {
    let server = start().await;
    let mut raw = client(&server).await.raw();
    let (tx, rx) = mpsc::channel(4);
    let call = tokio::spawn(async move { raw.push_weights(ReceiverStream::new(rx)).await });
    let mut msgs = messages(&all_tensor_bytes(&tiny_weights(2)), 4096, 1);
    msgs.truncate(msgs.len() / 2);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    // The client goes away mid-stream (its task is dropped: the HTTP/2
    // stream is reset), with the sender still open.
    tokio::time::sleep(Duration::from_millis(100)).await;
    call.abort();
    let _ = call.await;
    drop(tx);
    // Once the server has seen the reset, a new push is taken.
    let new = tiny_weights(3);
    let mut tries = 0;
    let result = loop {
        tries += 1;
        let before = snapshot(&server.sink.weights());
        assert_eq!(
            before,
            snapshot(&tiny_weights(1)),
            "the cut push changed weights"
        );
        assert_eq!(server.sink.version(), 0);
        match push_weights(&server.endpoint, all_tensor_bytes(&new), 1, None, DEADLINE).await {
            Err(e) if e.code() == Some(Code::Unavailable) && tries < 50 => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    assert_eq!(result.unwrap().version, 1);
    assert_eq!(snapshot(&server.sink.weights()), snapshot(&new));
}

#[tokio::test]
async fn wrong_checksum_is_data_loss() {
    let server = start().await;
    let mut msgs = messages(&all_tensor_bytes(&tiny_weights(2)), 4096, 1);
    if let Some(WeightChunk {
        kind: Some(proto::weight_sync::weight_chunk::Kind::Commit(commit)),
    }) = msgs.last_mut()
    {
        commit.checksum ^= 1;
    }
    assert_status(
        push_raw(&server, msgs).await,
        Code::DataLoss,
        "checksum mismatch",
    );
    assert_unchanged(&server);

    // A flipped payload byte under the right commit is caught the same way.
    let mut msgs = messages(&all_tensor_bytes(&tiny_weights(2)), 4096, 1);
    let commit = msgs.pop().unwrap();
    if let Some(proto::weight_sync::weight_chunk::Kind::Tensor(chunk)) = &mut msgs[3].kind {
        let mut data = chunk.data.to_vec();
        data[0] ^= 0x40;
        chunk.data = Bytes::from(data);
    }
    msgs.push(commit);
    assert_status(
        push_raw(&server, msgs).await,
        Code::DataLoss,
        "checksum mismatch",
    );
    assert_unchanged(&server);
}

#[tokio::test]
async fn unknown_tensor_is_invalid_argument() {
    let server = start().await;
    let new = tiny_weights(2);
    let mut tensors = vec![tensor_bytes(&new, EMBED)];
    let mut stray = tensor_bytes(&new, Q_PROJ);
    stray.name = "model.layers.99.self_attn.q_proj.weight".into();
    tensors.push(stray);
    let result = client(&server).await.push(tensors, 1, DEADLINE).await;
    assert_code(
        result,
        Code::InvalidArgument,
        "model.layers.99.self_attn.q_proj.weight",
    );
    assert_unchanged(&server);
}

#[tokio::test]
async fn shape_mismatch_is_invalid_argument() {
    let server = start().await;
    let good = tensor_bytes(&tiny_weights(2), K_PROJ);
    let (rows, cols) = (good.shape[0], good.shape[1]);
    assert_ne!(rows, cols);
    let bad = TensorBytes {
        shape: vec![cols, rows],
        ..good
    };
    let result = client(&server).await.push([bad], 1, DEADLINE).await;
    assert_code(
        result,
        Code::InvalidArgument,
        &format!("{K_PROJ}: shape mismatch: expected [{rows}, {cols}], got [{cols}, {rows}]"),
    );
    assert_unchanged(&server);
}

#[tokio::test]
async fn unsupported_dtype_is_invalid_argument() {
    let server = start().await;
    let good = tensor_bytes(&tiny_weights(2), Q_PROJ);
    let mut chunks: Vec<TensorChunk> = good.chunks(4096).collect();
    for c in &mut chunks {
        c.dtype = "I32".into();
    }
    let result = push_raw(&server, commit_after(chunks, 1, 1)).await;
    assert_status(result, Code::InvalidArgument, Q_PROJ);
    let mut chunks: Vec<TensorChunk> = good.chunks(4096).collect();
    chunks[0].dtype = "F64".into();
    let status = push_raw(&server, commit_after(chunks, 1, 1))
        .await
        .unwrap_err();
    assert!(status.message().contains("expected F32"), "{status:?}");
    assert!(status.message().contains("got \"F64\""), "{status:?}");
    // A later chunk that changes its tensor's dtype.
    let mut chunks: Vec<TensorChunk> = good.chunks(4096).collect();
    chunks[1].dtype = "BF16".into();
    assert_status(
        push_raw(&server, commit_after(chunks, 1, 1)).await,
        Code::InvalidArgument,
        Q_PROJ,
    );
    assert_unchanged(&server);
}

#[tokio::test]
async fn gaps_overlaps_and_wrong_counts_are_invalid_argument() {
    let server = start().await;
    let good = tensor_bytes(&tiny_weights(2), Q_PROJ);
    let chunks: Vec<TensorChunk> = good.chunks(1000).collect();

    let mut gap = chunks.clone();
    gap.remove(2);
    assert_status(
        push_raw(&server, commit_after(gap, 1, 1)).await,
        Code::InvalidArgument,
        "first missing byte at offset 2000",
    );

    let mut overlap = chunks.clone();
    overlap.insert(3, chunks[1].clone());
    assert_status(
        push_raw(&server, commit_after(overlap, 1, 1)).await,
        Code::InvalidArgument,
        "overlaps",
    );

    let mut past_end = chunks.clone();
    past_end[0].offset = good.data.len() as u64 - 10;
    assert_status(
        push_raw(&server, commit_after(past_end, 1, 1)).await,
        Code::InvalidArgument,
        "runs past",
    );

    assert_status(
        push_raw(&server, commit_after(chunks, 2, 1)).await,
        Code::InvalidArgument,
        "announces 2 tensors",
    );
    assert_unchanged(&server);
}

#[tokio::test]
async fn stale_version_is_failed_precondition() {
    let server = start().await;
    let c = client(&server).await;
    c.push([tensor_bytes(&tiny_weights(2), EMBED)], 3, DEADLINE)
        .await
        .unwrap();
    let before = snapshot(&server.sink.weights());
    for stale in [3, 2] {
        let result = c
            .push([tensor_bytes(&tiny_weights(5), EMBED)], stale, DEADLINE)
            .await;
        assert_code(
            result,
            Code::FailedPrecondition,
            "not newer than the current version 3",
        );
    }
    assert_eq!(server.sink.version(), 3);
    assert_eq!(snapshot(&server.sink.weights()), before);
}

#[tokio::test]
async fn token_is_required_when_set() {
    let server = start_with(WeightSyncConfig {
        token: Some("s3cret".into()),
        ..WeightSyncConfig::default()
    })
    .await;
    let tensors = || [tensor_bytes(&tiny_weights(2), EMBED)];
    for token in [None, Some("wrong"), Some("s3cret-but-longer")] {
        let result = push_weights(&server.endpoint, tensors(), 1, token, DEADLINE).await;
        assert_code(result, Code::Unauthenticated, "token");
        let err = get_version(&server.endpoint, token, DEADLINE)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::Unauthenticated));
    }
    assert_unchanged(&server);
    push_weights(&server.endpoint, tensors(), 1, Some("s3cret"), DEADLINE)
        .await
        .unwrap();
    let info = get_version(&server.endpoint, Some("s3cret"), DEADLINE)
        .await
        .unwrap();
    assert_eq!(info.version, 1);
}

#[tokio::test]
async fn get_version_reports_the_model() {
    let server = start().await;
    let info = get_version(&server.endpoint, None, DEADLINE).await.unwrap();
    let weights = tiny_weights(1);
    assert_eq!(info.version, 0);
    assert_eq!(info.model, "tiny");
    assert_eq!(info.num_tensors, weights.len() as u64);
    let bytes: usize = weights.iter().map(|(_, t)| t.elem_count() * 4).sum();
    assert_eq!(info.model_bytes, bytes as u64);
    assert_eq!(info.dtype, "F32");
    client(&server)
        .await
        .push([tensor_bytes(&tiny_weights(2), EMBED)], 7, DEADLINE)
        .await
        .unwrap();
    let info = client(&server).await.version(DEADLINE).await.unwrap();
    assert_eq!(info.version, 7);
}

#[tokio::test]
async fn a_second_concurrent_push_is_unavailable() {
    let server = start().await;
    let mut raw = client(&server).await.raw();
    let (tx, rx) = mpsc::channel(4);
    let first = tokio::spawn(async move { raw.push_weights(ReceiverStream::new(rx)).await });
    let mut msgs = messages(&[tensor_bytes(&tiny_weights(2), EMBED)], 4096, 1);
    let commit = msgs.pop().unwrap();
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    // The second push carries a wrong checksum: should it get in before the
    // first (a slow machine), it is refused at its commit and tried again.
    let mut second = messages(&[tensor_bytes(&tiny_weights(3), EMBED)], 4096, 2);
    if let Some(proto::weight_sync::weight_chunk::Kind::Commit(c)) =
        second.last_mut().and_then(|m| m.kind.as_mut())
    {
        c.checksum ^= 1;
    }
    let mut tries = 0;
    loop {
        tries += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let status = push_raw(&server, second.clone()).await.unwrap_err();
        if status.code() == Code::Unavailable {
            assert!(status.message().contains("in progress"), "{status:?}");
            break;
        }
        assert_eq!(status.code(), Code::DataLoss, "{status:?}");
        assert!(tries < 100, "the first push never took the lock");
    }
    // The first push completes normally.
    tx.send(commit).await.unwrap();
    drop(tx);
    let first = first.await.unwrap().unwrap().into_inner();
    assert_eq!(first.version, 1);
    assert_eq!(server.sink.version(), 1);
}

#[tokio::test]
async fn a_push_over_the_limit_is_resource_exhausted() {
    let server = start_with(WeightSyncConfig {
        max_push_bytes: Some(10_000),
        ..WeightSyncConfig::default()
    })
    .await;
    let result = client(&server)
        .await
        .push([tensor_bytes(&tiny_weights(2), EMBED)], 1, DEADLINE)
        .await;
    assert_code(result, Code::ResourceExhausted, "10000 bytes");
    assert_unchanged(&server);
}

#[tokio::test]
async fn a_stalled_push_is_aborted() {
    let server = start_with(WeightSyncConfig {
        idle_timeout: Duration::from_millis(300),
        ..WeightSyncConfig::default()
    })
    .await;
    let mut raw = client(&server).await.raw();
    let (tx, rx) = mpsc::channel(4);
    let msgs = messages(&[tensor_bytes(&tiny_weights(2), EMBED)], 4096, 1);
    tx.send(msgs[0].clone()).await.unwrap();
    let result = raw.push_weights(ReceiverStream::new(rx)).await;
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("stalled"), "{status:?}");
    drop(tx);
    assert_unchanged(&server);
}

#[tokio::test]
async fn a_message_over_4_mib_is_accepted() {
    // tonic refuses messages over 4 MiB by default; both ends raise it.
    let big = |v: f32| Tensor::full(v, (2048, 1024), &Device::Cpu).unwrap();
    let weights = Weights::new(BTreeMap::from([("big.weight".to_string(), big(0.0))]));
    let server = start_on(weights, WeightSyncConfig::default()).await;
    let pushed = Weights::new(BTreeMap::from([("big.weight".to_string(), big(0.5))]));
    let tensor = tensor_bytes(&pushed, "big.weight");
    assert_eq!(tensor.data.len(), 8 << 20);
    let result = client(&server)
        .await
        .with_chunk_bytes(8 << 20)
        .push([tensor], 1, DEADLINE)
        .await
        .unwrap();
    assert_eq!(result.bytes, 8 << 20);
    assert_eq!(
        f32_bits(server.sink.weights().get("big.weight").unwrap()),
        f32_bits(&big(0.5))
    );
}

/// The real binary: a push changes its greedy completions and the
/// `metadata.weight_version` it reports; refused pushes change neither; pushing
/// the original weights back restores the original completions exactly.
#[tokio::test]
async fn binary_swaps_pushed_weights_between_requests() {
    let dir = e2e::tiny_model();
    let server = common::Server::start(&["--weight-sync-token", "tok"]).await;
    let grpc = server.grpc_url();
    let greedy = || async {
        let body = serde_json::json!({
            "model": "tiny",
            "prompt": "12+34=",
            "max_tokens": 12,
            "temperature": 0,
            "return_token_ids": true,
        });
        let (status, json) = server.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{json}");
        let ids = json["choices"][0]["token_ids"].clone();
        assert!(ids.as_array().is_some_and(|a| !a.is_empty()), "{json}");
        (ids, json["metadata"]["weight_version"].as_u64().unwrap())
    };
    let (original, v0) = greedy().await;
    assert_eq!(v0, 0);
    assert_eq!(
        greedy().await,
        (original.clone(), 0),
        "greedy is deterministic"
    );

    let cfg = model::ModelConfig::from_dir(&dir).unwrap();
    let initial = Weights::load(&dir, &Device::Cpu, DType::F32).unwrap();
    // At the init scale (std 0.02) the residual stream is the input embedding
    // and every random tiny model greedily repeats the prompt's last token;
    // larger weights make the layers, and so the push, visible in the output.
    let new = Weights::new(
        Weights::random(&cfg, 7, &Device::Cpu, DType::F32)
            .unwrap()
            .iter()
            .map(|(n, t)| (n.clone(), (t * 25.0).unwrap()))
            .collect(),
    );
    let info = get_version(&grpc, Some("tok"), DEADLINE).await.unwrap();
    assert_eq!((info.version, info.num_tensors), (0, initial.len() as u64));

    // Refused pushes: no token, and a stream cut before its commit.
    let result = push_weights(&grpc, all_tensor_bytes(&new), 1, None, DEADLINE).await;
    assert_code(result, Code::Unauthenticated, "token");
    let mut raw = Client::connect(&grpc, Some("tok"), DEADLINE)
        .await
        .unwrap()
        .raw();
    let mut msgs = messages(&all_tensor_bytes(&new), 4096, 1);
    msgs.truncate(msgs.len() / 2);
    let mut request = tonic::Request::new(tokio_stream::iter(msgs));
    proto::weight_sync::authorize(&mut request, "tok").unwrap();
    let status = raw.push_weights(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(greedy().await, (original.clone(), 0));

    let result = push_weights(&grpc, all_tensor_bytes(&new), 1, Some("tok"), DEADLINE)
        .await
        .unwrap();
    assert_eq!(result.tensors_updated, initial.len() as u64);
    let (pushed, v1) = greedy().await;
    assert_eq!(v1, 1);
    assert_ne!(pushed, original, "new weights, same greedy completion");

    push_weights(&grpc, all_tensor_bytes(&initial), 2, Some("tok"), DEADLINE)
        .await
        .unwrap();
    assert_eq!(greedy().await, (original, 2));
    let info = get_version(&grpc, Some("tok"), DEADLINE).await.unwrap();
    assert_eq!(info.version, 2);
}
