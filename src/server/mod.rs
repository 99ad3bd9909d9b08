//! `resid serve`: an OpenAI-compatible HTTP server over the scheduler, with per-request
//! steering, live probe readouts and hidden-state extraction.
//!
//! The HTTP side (tokio, axum over hyper) parses and validates requests, renders answers and
//! streams; one scheduler thread owns the KV arena and runs every forward pass. They talk
//! through a channel of commands one way and per-request channels of events the other way, so
//! a client that goes away is noticed by the scheduler at its next step.
pub mod api;
pub mod metrics;
mod openai;
mod vectors;

use crate::backend::Backend;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::ModelDir;
use crate::sched::{CaptureListener, CaptureRequest, GenListener, GenRequest, SchedConfig, Scheduler};
use api::ApiError;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use metrics::Metrics;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
pub use vectors::VectorStore;

/// Everything `resid serve` takes besides the model.
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub vectors_dir: Option<PathBuf>,
    pub max_batch_tokens: usize,
    pub max_running: usize,
    pub max_queue: usize,
    pub kv_budget_mib: usize,
    /// Keep finished sequences' keys and values for prompts that begin with their tokens.
    pub prefix_cache: bool,
    pub served_model_name: String,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Largest `n` (choices per prompt).
    pub max_n: usize,
    /// Seconds a request may take in all unless it asks for less (`timeout`).
    pub request_timeout: f64,
    /// Seconds a client has to send its headers, and then its body.
    pub client_timeout: f64,
    /// Seconds SIGTERM waits for running requests before it stops them.
    pub drain_timeout: f64,
    /// Told the bound address once the server accepts connections.
    pub on_ready: Option<Box<dyn FnOnce(SocketAddr) + Send>>,
}

impl ServeConfig {
    pub fn new(served_model_name: String) -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            vectors_dir: None,
            max_batch_tokens: 2048,
            max_running: 64,
            max_queue: 256,
            kv_budget_mib: 1024,
            prefix_cache: true,
            served_model_name,
            max_body_bytes: 32 << 20,
            max_n: 16,
            request_timeout: 600.0,
            client_timeout: 30.0,
            drain_timeout: 30.0,
            on_ready: None,
        }
    }
}

/// What the HTTP side needs of the model, without its backend's type.
trait ModelView: Send + Sync {
    fn model(&self) -> &ModelDir;
    fn stop_tokens(&self) -> &[u32];
}

struct LoadedModel<B: Backend> {
    engine: Arc<Engine<B>>,
    stop_tokens: Vec<u32>,
}

impl<B: Backend + Send + Sync + 'static> ModelView for LoadedModel<B> {
    fn model(&self) -> &ModelDir {
        &self.engine.model
    }
    fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }
}

enum Command {
    Gen(Box<GenRequest>, Box<dyn GenListener>),
    Capture(Box<CaptureRequest>, Box<dyn CaptureListener>),
}

/// State shared by every handler.
struct App {
    model: Arc<dyn ModelView>,
    name: String,
    /// The compute type (`f32`, `bf16`), in extraction metadata.
    compute: &'static str,
    created: u64,
    api_key_digest: Option<[u8; 32]>,
    vectors: VectorStore,
    metrics: Arc<Metrics>,
    commands: std::sync::Mutex<Option<std::sync::mpsc::Sender<Command>>>,
    /// Requests submitted and not yet admitted by the scheduler.
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    max_n: usize,
    kv_slots: usize,
    request_timeout: f64,
    max_body_bytes: usize,
    draining: AtomicBool,
}

/// Holds one place in the queue until the scheduler admits the request (or it is dropped).
struct QueueTicket(Arc<AtomicUsize>);

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl App {
    fn limits(&self) -> api::Limits {
        let c = &self.model.model().config;
        api::Limits { num_layers: c.num_layers, hidden: c.hidden_size, vocab: c.vocab_size, max_n: self.max_n, max_prompts: 64 }
    }

    /// Takes `count` places in the queue, or refuses with 429.
    fn enqueue(&self, count: usize) -> std::result::Result<Vec<QueueTicket>, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::status(503, "server_error", "the server is shutting down"));
        }
        let before = self.waiting.fetch_add(count, Ordering::SeqCst);
        if before + count > self.max_queue {
            self.waiting.fetch_sub(count, Ordering::SeqCst);
            self.metrics.rejected_queue_full.add(1);
            return Err(ApiError { status: 429, message: format!("the queue is full ({} requests waiting); retry later", before), kind: "rate_limit_error", param: None, code: Some("queue_full") });
        }
        Ok((0..count).map(|_| QueueTicket(self.waiting.clone())).collect())
    }

    fn send(&self, cmd: Command) -> std::result::Result<(), ApiError> {
        let guard = self.commands.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref().map(|tx| tx.send(cmd)) {
            Some(Ok(())) => Ok(()),
            _ => Err(ApiError::status(503, "server_error", "the server is shutting down")),
        }
    }

    fn max_body_hint(&self) -> usize {
        self.max_body_bytes
    }

    fn check_model(&self, model: &Option<String>) -> std::result::Result<(), ApiError> {
        match model {
            Some(m) if m != &self.name => Err(ApiError::not_found("model", format!("the model `{m}` does not exist; this server serves `{}`", self.name), "model_not_found")),
            _ => Ok(()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.body())).into_response();
        if self.status == 429 {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// A library error as an API error: what the client supplied is 400, the rest 500.
fn api_error(e: &Error, param: &str) -> ApiError {
    match e {
        Error::Input(m) => ApiError::invalid(param, m.clone()),
        Error::Interrupted { .. } => ApiError::status(503, "server_error", e.to_string()),
        _ => ApiError::status(500, "server_error", e.to_string()),
    }
}

/// Serves `engine` until SIGTERM or SIGINT, then drains and returns.
pub fn serve<B: Backend + Send + Sync + 'static>(engine: Engine<B>, mut cfg: ServeConfig) -> Result<()> {
    let engine = Arc::new(engine);
    let c = &engine.model.config;
    let vectors = VectorStore::new(c.num_layers, c.hidden_size);
    if let Some(dir) = &cfg.vectors_dir {
        let n = vectors.load_dir(dir)?;
        eprintln!("loaded {n} steering vectors from {}", dir.display());
    }
    if cfg.max_queue == 0 || cfg.max_running == 0 || cfg.max_n == 0 {
        return Err(Error::input("--max-queue, --max-running and --max-n must be at least 1"));
    }
    if cfg.max_batch_tokens < 2 {
        return Err(Error::input(format!("--max-batch-tokens {}: must be at least 2", cfg.max_batch_tokens)));
    }
    let kv_slots = SchedConfig::kv_slots_for_budget(&engine, cfg.kv_budget_mib);
    if kv_slots < 2 {
        return Err(Error::input(format!("--kv-budget-mib {}: holds {kv_slots} tokens of this model's KV cache; give more", cfg.kv_budget_mib)));
    }
    let sched_cfg = SchedConfig { max_batch_tokens: cfg.max_batch_tokens, max_running: cfg.max_running, kv_slots, check_interrupt: false, prefix_cache: cfg.prefix_cache };
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = std::sync::mpsc::channel::<Command>();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let scheduler = {
        let (engine, metrics, stop) = (engine.clone(), metrics.clone(), stop.clone());
        std::thread::Builder::new()
            .name("resid-scheduler".into())
            .spawn(move || scheduler_loop(&engine, sched_cfg, rx, &metrics, &stop, ready_tx))
            .map_err(|e| Error::input(format!("cannot start the scheduler thread: {e}")))?
    };
    ready_rx.recv().map_err(|_| Error::input("the scheduler thread stopped at start"))??;
    let stop_tokens = crate::repe::control::stop_tokens(&engine);
    let app = Arc::new(App {
        model: Arc::new(LoadedModel { engine: engine.clone(), stop_tokens }),
        name: cfg.served_model_name.clone(),
        compute: engine.backend.compute_type(),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        api_key_digest: cfg.api_key.as_deref().map(digest),
        vectors,
        metrics,
        commands: std::sync::Mutex::new(Some(tx)),
        waiting: Arc::new(AtomicUsize::new(0)),
        max_queue: cfg.max_queue,
        max_n: cfg.max_n,
        kv_slots,
        request_timeout: cfg.request_timeout,
        max_body_bytes: cfg.max_body_bytes,
        draining: AtomicBool::new(false),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("resid-http")
        .build()
        .map_err(|e| Error::input(format!("cannot start the HTTP runtime: {e}")))?;
    let on_ready = cfg.on_ready.take();
    let served = runtime.block_on(http_main(app.clone(), &cfg, on_ready));
    // No new commands: the scheduler finishes what it holds, or stops if told to.
    app.commands.lock().unwrap_or_else(|p| p.into_inner()).take();
    let drained = served?;
    if !drained {
        stop.store(true, Ordering::SeqCst);
    }
    let _ = scheduler.join();
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// The scheduler thread: takes commands, runs passes, publishes gauges.
fn scheduler_loop<B: Backend>(
    engine: &Engine<B>,
    cfg: SchedConfig,
    rx: std::sync::mpsc::Receiver<Command>,
    metrics: &Metrics,
    stop: &AtomicBool,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let mut sched = match Scheduler::new(engine, cfg) {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut open = true;
    // A refused request hears why through its listener.
    let submit = |sched: &mut Scheduler<B>, cmd: Command| match cmd {
        Command::Gen(req, listener) => {
            let _ = sched.submit(*req, listener);
        }
        Command::Capture(req, listener) => {
            let _ = sched.submit_capture(*req, listener);
        }
    };
    while !stop.load(Ordering::SeqCst) {
        loop {
            let cmd = if sched.is_idle() && open {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(c) => c,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            submit(&mut sched, cmd);
        }
        if !open && sched.is_idle() {
            break;
        }
        match sched.step() {
            Ok(Some(r)) => {
                metrics.passes.add(1);
                metrics.rows_per_pass.observe(r.rows as f64);
                metrics.generation_tokens.add(r.generated_tokens as u64);
                metrics.cached_prompt_tokens.add(r.cached_tokens as u64);
            }
            Ok(None) => {
                if !sched.is_idle() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            // Only interruption fails a whole step, and the server does not ask for it.
            Err(e) => eprintln!("scheduler: {e}"),
        }
        metrics.running.store(sched.running() as u64, Ordering::Relaxed);
        metrics.queued.store(sched.queued() as u64, Ordering::Relaxed);
        let (prefixes, cached_tokens) = sched.cached_prefixes();
        metrics.cached_prefixes.store(prefixes as u64, Ordering::Relaxed);
        metrics.cached_prefix_tokens.store(cached_tokens as u64, Ordering::Relaxed);
    }
}

fn router(app: Arc<App>, cfg: &ServeConfig) -> Router {
    Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/hidden_states", post(openai::hidden_states))
        .route("/v1/steering/vectors", get(openai::list_vectors).post(openai::upload_vector))
        .route("/v1/steering/vectors/{name}", delete(openai::delete_vector))
        .route("/health", get(openai::health))
        .route("/metrics", get(openai::metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(Duration::from_secs_f64(cfg.client_timeout)))
        .with_state(app)
}

async fn unknown_route(req: Request) -> Response {
    ApiError { code: Some("unknown_url"), ..ApiError::status(404, "invalid_request_error", format!("unknown request URL: {} {}", req.method(), req.uri().path())) }.into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::status(405, "invalid_request_error", format!("{} is not allowed on {}", req.method(), req.uri().path())).into_response()
}

/// The API key (every route but /health, compared in constant time over SHA-256 digests, so
/// neither content nor length leaks) and request counting.
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if path != "/health" {
        if let Some(want) = &app.api_key_digest {
            use subtle::ConstantTimeEq;
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|k| digest(k.trim()));
            let ok = given.is_some_and(|g| bool::from(g.ct_eq(want)));
            if !ok {
                app.metrics.request_errors.add(1);
                return ApiError { code: Some("invalid_api_key"), ..ApiError::status(401, "invalid_request_error", "missing or incorrect API key (Authorization: Bearer KEY)") }.into_response();
            }
        }
    }
    let counted = path.starts_with("/v1/");
    if counted {
        app.metrics.requests.add(1);
    }
    let response = next.run(req).await;
    if counted && response.status().as_u16() >= 400 {
        app.metrics.request_errors.add(1);
    }
    response
}

/// Accepts connections until SIGTERM or SIGINT, then stops accepting and waits for open
/// connections (running requests) up to the drain timeout. Returns whether they all finished.
async fn http_main(app: Arc<App>, cfg: &ServeConfig, on_ready: Option<Box<dyn FnOnce(SocketAddr) + Send>>) -> Result<bool> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|e| Error::input(format!("cannot listen on {}:{}: {e}", cfg.host, cfg.port)))?;
    let addr = listener.local_addr().map_err(|e| Error::input(format!("cannot read the bound address: {e}")))?;
    let service = hyper_util::service::TowerToHyperService::new(router(app.clone(), cfg));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs_f64(cfg.client_timeout));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::input(format!("cannot watch SIGTERM: {e}")))?;
    if let Some(f) = on_ready {
        f(addr);
    }
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else {
                    // Out of file descriptors and the like: let connections close, then go on.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let conn = http.serve_connection(TokioIo::new(stream), service.clone());
                let watched = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = watched.await;
                });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(listener);
    app.draining.store(true, Ordering::SeqCst);
    eprintln!("shutting down: no new connections; draining running requests (up to {} s)", cfg.drain_timeout);
    let drained = tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(Duration::from_secs_f64(cfg.drain_timeout)) => false,
    };
    if !drained {
        eprintln!("drain timeout: stopping the requests still running");
    }
    Ok(drained)
}
