//! `resid serve` as a client sees it: real processes on loopback, raw HTTP/1.1. Outputs are
//! checked against the library's `Engine::generate` (what `resid generate` prints), a bounded
//! concurrent load against each request's result alone, bad input against OpenAI-shaped
//! errors, and cancellation, slow clients and SIGTERM against the scheduler's gauges and the
//! exit code. The official `openai` client is exercised by python/tests (scripts/test.sh).
mod common;

use resid::engine::steer::{SteerOp, SteerPositions, Steering};
use resid::io::{write_safetensors, OutTensor, TensorData};
use resid::{CpuEngine, GenerateOptions, Sampling};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const MODEL: &str = "models/smollm2-135m";

fn model_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(MODEL);
    common::real_model_present(&dir).then_some(dir)
}

fn engine() -> &'static CpuEngine {
    static E: OnceLock<CpuEngine> = OnceLock::new();
    E.get_or_init(|| CpuEngine::load(&model_dir().expect("model present")).expect("model loads"))
}

/// A running `resid serve`, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_resid"))
            .args(["serve", "--model"])
            .arg(model)
            .args(["--port", "0", "--threads", "2"])
            .args(extra)
            .envs(env.iter().copied())
            .env_remove("RESID_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("resid serve starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut reader = BufReader::new(child.stderr.take().expect("stderr piped"));
        let log = stderr.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if let Some(addr) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                log.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a.parse().expect("an address"),
            Err(_) => {
                let _ = child.kill();
                panic!("resid serve did not start:\n{}", stderr.lock().unwrap());
            }
        };
        Server { child, addr, stderr }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, bytes) = request(self.addr, "POST", path, &[("content-type", "application/json")], body.to_string().as_bytes());
        (status, serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes))))
    }

    fn get(&self, path: &str) -> (u16, String) {
        let (status, _, bytes) = request(self.addr, "GET", path, &[], b"");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A gauge or counter from /metrics.
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' '))).and_then(|v| v.trim().parse().ok()).unwrap_or(f64::NAN)
    }

    fn wait_metric(&self, name: &str, want: f64, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.metric(name) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange (Connection: close); returns status, headers and the decoded body.
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connects");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reads the response");
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("a status line");
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").expect("a chunk size");
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..end]).trim(), 16).expect("hex size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[end + 2..end + 2 + size]);
            rest = &rest[end + 2 + size + 2..];
        }
        body = out;
    }
    (status, headers, body)
}

/// The `data:` payloads of a server-sent event stream.
fn sse_events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body).lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))).map(str::to_owned).collect()
}

/// A vector file `[L+1, hidden]` with random rows at `layers` (zero elsewhere), of norm `scale`.
fn write_vector(path: &Path, seed: u64, layers: &[usize], scale: f32) -> Vec<f32> {
    let e = engine();
    let (l, h) = (e.num_layers(), e.hidden_size());
    let mut data = vec![0f32; (l + 1) * h];
    let mut rng = resid::repe::data::SplitMix64::new(seed);
    for &layer in layers {
        let row: Vec<f32> = (0..h).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0).collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        for (d, x) in data[layer * h..(layer + 1) * h].iter_mut().zip(row) {
            *d = x / norm * scale;
        }
    }
    write_safetensors(path, &[OutTensor { name: "directions".into(), shape: vec![l + 1, h], data: TensorData::F32(data.clone()) }], Default::default()).unwrap();
    data
}

struct Fixture {
    _dir: tempfile::TempDir,
    vectors: PathBuf,
    honesty: Vec<f32>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let vectors = dir.path().join("vectors");
    std::fs::create_dir_all(&vectors).unwrap();
    let honesty = write_vector(&vectors.join("honesty.safetensors"), 7, &[8, 9, 10, 11, 12], 8.0);
    write_vector(&vectors.join("power.safetensors"), 11, &[14, 15, 16], 8.0);
    Fixture { _dir: dir, vectors, honesty }
}

fn greedy(max: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: max, sampling: Sampling::Greedy, stop_tokens: resid::repe::control::stop_tokens(engine()) }
}

fn token_ids(choice: &Value) -> Vec<u32> {
    choice["token_ids"].as_array().expect("token_ids").iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

#[test]
fn completions_equal_resid_generate_with_and_without_steering() {
    let Some(model) = model_dir() else { return };
    let fx = fixture();
    let server = Server::start(&model, &["--vectors", fx.vectors.to_str().unwrap()], &[]);
    let e = engine();
    let tok = e.model.tokenizer.as_ref().unwrap();
    let prompt = "The most important value in life is";
    let ids = tok.encode(prompt).unwrap();
    let steer = Arc::new(Steering {
        directions: Arc::new(fx.honesty.clone()),
        hidden: e.hidden_size(),
        layers: vec![8, 9, 10, 11, 12],
        sites: Vec::new(),
        coef: 4.0,
        op: SteerOp::Add,
        preserve_norm: false,
        positions: SteerPositions::All,
    });
    let plain = e.generate(std::slice::from_ref(&ids), &[None], &greedy(12)).unwrap().remove(0);
    let steered = e.generate(std::slice::from_ref(&ids), &[Some(steer)], &greedy(12)).unwrap().remove(0);
    assert_ne!(plain.tokens, steered.tokens, "the vector must change the greedy text for this test to mean anything");

    let (status, r) = server.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(token_ids(&r["choices"][0]), plain.tokens);
    let shown: Vec<u32> = plain.tokens.iter().copied().filter(|t| !greedy(0).stop_tokens.contains(t)).collect();
    assert_eq!(r["choices"][0]["text"], tok.decode(&shown).unwrap());
    assert_eq!(r["usage"]["prompt_tokens"], ids.len());
    assert_eq!(r["usage"]["completion_tokens"], plain.tokens.len());

    let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0,
                      "steering": {"vector": "honesty", "coef": 4.0, "layers": "8-12"}});
    let (status, r) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(token_ids(&r["choices"][0]), steered.tokens);
    // Inline directions (the vector's own rows) steer exactly as the named vector.
    let h = e.hidden_size();
    let rows: Vec<Vec<f32>> = fx.honesty.chunks(h).map(<[f32]>::to_vec).collect();
    let (status, r) = server.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0,
        "steering": [{"directions": rows, "coef": 4.0, "layers": [8, 9, 10, 11, 12]}]}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(token_ids(&r["choices"][0]), steered.tokens);
    // The same through the stream: the chunks' tokens and text add up to the whole answer.
    let (status, _, raw) = request(server.addr, "POST", "/v1/completions", &[("content-type", "application/json")],
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": true, "steering": body["steering"]}).to_string().as_bytes());
    assert_eq!(status, 200);
    let events = sse_events(&raw);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let streamed: Vec<u32> = chunks.iter().flat_map(|c| c["choices"][0]["token_ids"].as_array().cloned().unwrap_or_default()).map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(streamed, steered.tokens);
    let text: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap_or("")).collect();
    let shown: Vec<u32> = steered.tokens.iter().copied().filter(|t| !greedy(0).stop_tokens.contains(t)).collect();
    assert_eq!(text, tok.decode(&shown).unwrap());
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
}

/// The prefix cache through the server: a conversation's next turn (the prompt, the answer and
/// a new question, as token ids) starts from the first request's cached keys and values, says
/// so in `usage.prompt_tokens_details.cached_tokens` (OpenAI's field) and in /metrics, and gets
/// exactly the tokens `resid generate` computes from scratch. `--no-prefix-cache` reuses nothing.
#[test]
fn the_next_turn_starts_from_the_cached_prefix() {
    let Some(model) = model_dir() else { return };
    let e = engine();
    let tok = e.model.tokenizer.as_ref().unwrap();
    let first = tok.encode("The most important value in life is").unwrap();
    let question = tok.encode(" Why is that so important to people?").unwrap();
    for (flags, on) in [(&[][..], true), (&["--no-prefix-cache"][..], false)] {
        let server = Server::start(&model, flags, &[]);
        let (s, r) = server.post("/v1/completions", &json!({"prompt": first, "max_tokens": 8, "temperature": 0, "ignore_eos": true}));
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        let answer = token_ids(&r["choices"][0]);
        assert_eq!(answer.len(), 8);
        let next = [first.clone(), answer.clone(), question.clone()].concat();
        let (s, r) = server.post("/v1/completions", &json!({"prompt": next, "max_tokens": 8, "temperature": 0, "ignore_eos": true}));
        assert_eq!(s, 200, "{r}");
        let opts = GenerateOptions { max_new_tokens: 8, sampling: Sampling::Greedy, stop_tokens: vec![] };
        let want = e.generate(std::slice::from_ref(&next), &[None], &opts).unwrap().remove(0).tokens;
        assert_eq!(token_ids(&r["choices"][0]), want, "prefix cache {on}");
        // The first prompt and every answer token but the last, which was never fed back.
        let cached = if on { first.len() + answer.len() - 1 } else { 0 };
        assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], cached, "{r}");
        assert_eq!(server.metric("resid_prompt_tokens_cached_total"), cached as f64);
        // The second sequence extends the first, which is dropped as no longer needed.
        assert!(server.wait_metric("resid_prefix_cache_sequences", if on { 1.0 } else { 0.0 }, Duration::from_secs(5)));
    }
}

#[test]
fn probes_read_the_residual_stream_of_each_generated_token() {
    let Some(model) = model_dir() else { return };
    let fx = fixture();
    let server = Server::start(&model, &["--vectors", fx.vectors.to_str().unwrap()], &[]);
    let e = engine();
    let prompt = "Honesty means";
    let (status, r) = server.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0,
        "probes": [{"vector": "honesty", "layer": 10}, {"vector": "power", "layer": 15}]}));
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    let tokens = token_ids(choice);
    // Independent recomputation: the hidden state at index l of the position that produced each
    // token (the prompt's last token, then each generated token but the last), projected on the
    // unit vector.
    let mut seq = e.model.tokenizer.as_ref().unwrap().encode(prompt).unwrap();
    let h = e.hidden_size();
    for (k, &t) in tokens.iter().enumerate() {
        let spec = resid::CaptureSpec { points: vec![resid::CapturePoint::Hidden(10)], position: resid::CapturePosition::Last };
        let cap = e.extract(std::slice::from_ref(&seq), &spec, &[None], 4096, |_, _| {}).unwrap();
        let v = &fx.honesty[10 * h..11 * h];
        let want = resid::sched::projection(cap.row(0, 0), v) as f64;
        let got = choice["probes"][0]["values"][k].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "token {k}: probe {got} vs recomputed {want}");
        seq.push(t);
    }
    assert_eq!(choice["probes"][1]["layer"], 15);
    assert_eq!(choice["probes"][1]["values"].as_array().unwrap().len(), tokens.len());
}

#[test]
fn concurrent_load_gives_each_request_its_sequential_result() {
    let Some(model) = model_dir() else { return };
    let fx = fixture();
    let server = Server::start(&model, &["--vectors", fx.vectors.to_str().unwrap(), "--max-batch-tokens", "64"], &[]);
    let prompts = ["Kindness is", "The law says that", "A fair society", "Freedom of speech", "Power corrupts because", "Tradition matters when", "Honesty is the best", "Respect for elders"];
    let steering = [
        Value::Null,
        json!({"vector": "honesty", "coef": 4.0, "layers": "8-12"}),
        json!({"vector": "power", "coef": -6.0, "layers": [14, 15, 16], "op": "piecewise", "positions": "generated"}),
        json!([{"vector": "honesty", "coef": 2.0}, {"vector": "power", "coef": 3.0}]),
    ];
    let body = |i: usize| {
        let mut b = json!({"prompt": prompts[i % 8], "max_tokens": 8, "probes": [{"vector": "honesty", "layer": 10}]});
        // Every other distinct request samples, with its own seed; half of those with top-k, and
        // two requests ask for log-probabilities: a pass with any of these picks every row on
        // the host, rows in parallel.
        if (i / 8) % 2 == 1 {
            b["temperature"] = json!(0.9);
            b["seed"] = json!(1000 + i % 16);
            if i % 2 == 1 {
                b["top_k"] = json!(40);
            }
        } else {
            b["temperature"] = json!(0);
        }
        if i % 8 == 5 {
            b["logprobs"] = json!(2);
        }
        if !steering[(i / 4) % 4].is_null() {
            b["steering"] = steering[(i / 4) % 4].clone();
        }
        b
    };
    let essence = |r: &Value| -> Value {
        let c = &r["choices"][0];
        json!({"tokens": c["token_ids"], "text": c["text"], "probes": c["probes"], "finish": c["finish_reason"], "logprobs": c["logprobs"]})
    };
    // Alone, one at a time: the 16 distinct requests.
    let alone: Vec<Value> = (0..16)
        .map(|i| {
            let (status, r) = server.post("/v1/completions", &body(i));
            assert_eq!(status, 200, "{r}");
            essence(&r)
        })
        .collect();
    // 64 requests, 16 at a time.
    let server = &server;
    let results: Vec<(usize, Value)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..16)
            .map(|w| {
                s.spawn(move || {
                    (0..4)
                        .map(|k| {
                            let i = w * 4 + k;
                            let (status, r) = server.post("/v1/completions", &body(i % 16));
                            assert_eq!(status, 200, "request {i}: {r}");
                            (i, essence(&r))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("worker")).collect()
    });
    assert_eq!(results.len(), 64, "every request answered");
    for (i, got) in &results {
        assert_eq!(got, &alone[i % 16], "request {i} under load differs from its result alone");
    }
    // The passes really were shared.
    let (_, metrics) = server.get("/metrics");
    let passes = server.metric("resid_forward_passes_total");
    let tokens = server.metric("resid_generation_tokens_total");
    assert!(tokens > passes * 1.5, "{tokens} tokens in {passes} passes: no batching?\n{metrics}");
    assert_eq!(server.metric("resid_requests_running"), 0.0);
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_stays_up() {
    let Some(model) = model_dir() else { return };
    let fx = fixture();
    let server = Server::start(&model, &["--vectors", fx.vectors.to_str().unwrap(), "--max-body-mib", "1", "--max-n", "4"], &[]);
    let h = engine().hidden_size();
    let check = |status: u16, r: &Value, want: u16, param: Option<&str>| {
        assert_eq!(status, want, "{r}");
        assert!(r["error"]["message"].as_str().is_some_and(|m| !m.is_empty() && !m.contains('\n')), "{r}");
        assert!(r["error"]["type"].is_string(), "{r}");
        if let Some(p) = param {
            assert_eq!(r["error"]["param"], p, "{r}");
        }
    };
    let raw = |body: &[u8]| {
        let (status, _, b) = request(server.addr, "POST", "/v1/completions", &[("content-type", "application/json")], body);
        (status, serde_json::from_slice::<Value>(&b).unwrap())
    };
    let (s, r) = raw(b"{\"prompt\": ");
    check(s, &r, 400, None);
    let (s, r) = raw(b"{\"prompt\": \"\xff\xfe\"}");
    check(s, &r, 400, None);
    let (s, r) = raw(&vec![b' '; 2 << 20]);
    check(s, &r, 413, None);
    let cases = [
        (json!({"prompt": "x", "steering": {"vector": "nope"}}), 404, "steering.vector"),
        (json!({"prompt": "x", "probes": [{"vector": "nope", "layer": 3}]}), 404, "probes[0].vector"),
        (json!({"prompt": "x", "steering": {"directions": [vec![0.5; h - 1]], "layers": [3]}}), 400, "steering.directions"),
        (json!({"prompt": "x", "steering": {"vector": "honesty", "layers": "40-50"}}), 400, "steering.layers"),
        (json!({"prompt": "x", "n": 5}), 400, "n"),
        (json!({"prompt": "x", "temperature": -1}), 400, "temperature"),
        (json!({"prompt": [1, 2, 999999]}), 400, "prompt"),
        (json!({"prompt": "x", "model": "gpt-4"}), 404, "model"),
        (json!({"prompt": "word ".repeat(9000)}), 400, "prompt"),
        (json!({"prompt": "x", "logprobs": 50}), 400, "logprobs"),
    ];
    for (body, want, param) in cases {
        let (s, r) = server.post("/v1/completions", &body);
        check(s, &r, want, Some(param));
    }
    let (s, r) = server.post("/v1/chat/completions", &json!({"messages": []}));
    check(s, &r, 400, Some("messages"));
    let (s, r) = server.post("/v1/nothing", &json!({}));
    check(s, &r, 404, None);
    // A huge max_tokens is capped at the context, and the request's deadline ends it: 504, and
    // its sequence is freed.
    let (s, r) = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1u64 << 60, "ignore_eos": true, "timeout": 1}));
    check(s, &r, 504, None);
    assert!(server.wait_metric("resid_requests_running", 0.0, Duration::from_secs(5)), "the expired request still runs");
    // After all that, it still answers.
    let (s, r) = server.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2}));
    assert_eq!(s, 200, "{r}");
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn api_key_guards_every_route_but_health() {
    let Some(model) = model_dir() else { return };
    let server = Server::start(&model, &["--api-key", "sekret"], &[]);
    let (s, _, b) = request(server.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(s, 401, "{}", String::from_utf8_lossy(&b));
    let (s, _, _) = request(server.addr, "GET", "/v1/models", &[("authorization", "Bearer sekre")], b"");
    assert_eq!(s, 401);
    let (s, _, _) = request(server.addr, "GET", "/metrics", &[], b"");
    assert_eq!(s, 401);
    let (s, _, b) = request(server.addr, "GET", "/v1/models", &[("authorization", "Bearer sekret")], b"");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(request(server.addr, "GET", "/health", &[], b"").0, 200);
}

#[test]
fn vectors_can_be_uploaded_listed_and_removed() {
    let Some(model) = model_dir() else { return };
    let fx = fixture();
    let server = Server::start(&model, &[], &[]);
    let bytes = std::fs::read(fx.vectors.join("honesty.safetensors")).unwrap();
    let (s, _, b) = request(server.addr, "POST", "/v1/steering/vectors?name=honesty", &[], &bytes);
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
    let listed: Value = serde_json::from_str(&server.get("/v1/steering/vectors").1).unwrap();
    assert_eq!(listed["data"][0]["id"], "honesty");
    assert_eq!(listed["data"][0]["nonzero_layers"], json!([8, 9, 10, 11, 12]));
    assert_eq!(request(server.addr, "POST", "/v1/steering/vectors?name=honesty", &[], &bytes).0, 409);
    assert_eq!(request(server.addr, "POST", "/v1/steering/vectors?name=bad", &[], b"not a vector").0, 400);
    assert_eq!(request(server.addr, "POST", "/v1/steering/vectors?name=..%2Fx", &[], &bytes).0, 400);
    // A GGUF control vector, as llama.cpp reads it, works too.
    let e = engine();
    let gguf = resid::repe::gguf::control_vector_bytes(&[(9, &fx.honesty[10 * e.hidden_size()..11 * e.hidden_size()])], "llama");
    assert_eq!(request(server.addr, "POST", "/v1/steering/vectors?name=cv", &[], &gguf).0, 201);
    let (s, r) = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2, "steering": {"vector": "cv", "coef": 2}}));
    assert_eq!(s, 200, "{r}");
    assert_eq!(request(server.addr, "DELETE", "/v1/steering/vectors/honesty", &[], b"").0, 200);
    assert_eq!(request(server.addr, "DELETE", "/v1/steering/vectors/honesty", &[], b"").0, 404);
    let (s, _) = server.post("/v1/completions", &json!({"prompt": "Hi", "steering": {"vector": "honesty"}}));
    assert_eq!(s, 404);
}

#[test]
fn hidden_states_equal_resid_extract() {
    let Some(model) = model_dir() else { return };
    let server = Server::start(&model, &[], &[]);
    let e = engine();
    let texts = ["A short one.", "A somewhat longer sentence about values and power."];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| e.model.tokenizer.as_ref().unwrap().encode(t).unwrap()).collect();
    for position in ["last", "mean", "all"] {
        let spec = resid::CaptureSpec {
            points: vec![resid::CapturePoint::Hidden(0), resid::CapturePoint::Hidden(7), resid::CapturePoint::LastBlockRaw],
            position: position.parse().unwrap(),
        };
        let want = e.extract(&ids, &spec, &[None, None], 2048, |_, _| {}).unwrap();
        // Binary: safetensors bytes.
        let body = json!({"input": texts, "layers": "0,7,raw", "position": position});
        let (s, headers, bytes) = request(server.addr, "POST", "/v1/hidden_states", &[("accept", "application/octet-stream")], body.to_string().as_bytes());
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&bytes));
        assert!(headers.iter().any(|(k, v)| k == "content-type" && v == "application/octet-stream"));
        let t = resid::io::f32_tensor_from_bytes(&bytes, "response", "hidden_states").unwrap();
        assert_eq!(t.shape, vec![want.rows, 3, e.hidden_size()]);
        assert_eq!(t.data, want.data, "{position}: the server's capture differs from the engine's");
        // JSON: base64 of the same little-endian floats.
        let (s, r) = server.post("/v1/hidden_states", &body);
        assert_eq!(s, 200, "{r}");
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        let floats: Vec<f32> = raw.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(floats, want.data);
        assert_eq!(r["layers"], json!([0, 7, -1]));
        if position == "all" {
            assert_eq!(r["offsets"], json!(want.offsets));
        }
    }
}

#[test]
fn a_client_that_leaves_frees_its_sequence() {
    let Some(model) = model_dir() else { return };
    let server = Server::start(&model, &[], &[]);
    for stream in [true, false] {
        let mut s = TcpStream::connect(server.addr).unwrap();
        let body = json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true, "stream": stream}).to_string();
        write!(s, "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
        assert!(server.wait_metric("resid_requests_running", 1.0, Duration::from_secs(30)), "the request never ran");
        let before = server.metric("resid_generation_tokens_total");
        drop(s);
        assert!(server.wait_metric("resid_requests_running", 0.0, Duration::from_secs(5)), "stream={stream}: the sequence was not freed after the client left");
        let after = server.metric("resid_generation_tokens_total");
        assert!(after - before < 400.0, "stream={stream}: {} tokens generated after the client left", after - before);
    }
    // A client that never finishes its headers is cut off; others are served meanwhile.
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n").unwrap();
    let (s, _) = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1}));
    assert_eq!(s, 200);
}

#[test]
fn queue_limit_answers_429_with_retry_after() {
    let Some(model) = model_dir() else { return };
    let server = Server::start(&model, &["--max-running", "1", "--max-queue", "1"], &[]);
    let long = json!({"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": true}).to_string();
    let addr = server.addr;
    let first = std::thread::spawn(move || request(addr, "POST", "/v1/completions", &[("content-type", "application/json")], long.as_bytes()).0);
    assert!(server.wait_metric("resid_requests_running", 1.0, Duration::from_secs(30)));
    let queued = json!({"prompt": "Hi", "max_tokens": 1}).to_string();
    let second = std::thread::spawn(move || request(addr, "POST", "/v1/completions", &[("content-type", "application/json")], queued.as_bytes()).0);
    assert!(server.wait_metric("resid_requests_queued", 1.0, Duration::from_secs(30)));
    let (s, headers, b) = request(server.addr, "POST", "/v1/completions", &[("content-type", "application/json")], br#"{"prompt":"Hi","max_tokens":1}"#);
    assert_eq!(s, 429, "{}", String::from_utf8_lossy(&b));
    assert!(headers.iter().any(|(k, v)| k == "retry-after" && v == "1"));
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(second.join().unwrap(), 200);
}

#[test]
fn sigterm_drains_running_requests_and_exits_0() {
    let Some(model) = model_dir() else { return };
    let mut server = Server::start(&model, &[], &[]);
    let addr = server.addr;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": true, "temperature": 0}).to_string();
    let running = std::thread::spawn(move || {
        let (s, _, b) = request(addr, "POST", "/v1/completions", &[("content-type", "application/json")], body.as_bytes());
        (s, serde_json::from_slice::<Value>(&b).unwrap())
    });
    assert!(server.wait_metric("resid_requests_running", 1.0, Duration::from_secs(30)));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc_kill(server.child.id() as i32, 15) };
    let (s, r) = running.join().unwrap();
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["choices"][0]["token_ids"].as_array().unwrap().len(), 40, "the running request was cut short");
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", server.stderr.lock().unwrap());
    assert!(TcpStream::connect(addr).is_err(), "still accepting after SIGTERM");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn serves_on_the_cuda_backend_through_the_emulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let libs = root.join("target").join("emu");
    let build = Command::new("bash").arg(root.join("scripts/build-emu.sh")).arg(&libs).output().expect("bash runs");
    assert!(build.status.success(), "scripts/build-emu.sh failed:\n{}", String::from_utf8_lossy(&build.stderr));
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let tiny = resid::testing::RandomLlama { layers: 2, ..resid::testing::RandomLlama::small(5) };
    tiny.write(&model).unwrap();
    let cpu_engine = CpuEngine::load(&model).unwrap();
    let prompt: Vec<u32> = vec![1, 5, 9, 13, 17];
    let dirs: Vec<Vec<f32>> = (0..3).map(|l| (0..128).map(|i| ((i * 7 + l) % 13) as f32 * 0.1 - 0.6).collect()).collect();
    let steer = Arc::new(Steering {
        directions: Arc::new(dirs.concat()),
        hidden: 128,
        layers: vec![1, 2],
        sites: Vec::new(),
        coef: 3.0,
        op: SteerOp::Add,
        preserve_norm: false,
        positions: SteerPositions::All,
    });
    let opts = GenerateOptions { max_new_tokens: 6, sampling: Sampling::Greedy, stop_tokens: vec![] };
    let want = cpu_engine.generate(&[prompt.clone(), prompt.clone()], &[None, Some(steer)], &opts).unwrap();
    let cache = dir.path().join("kernels");
    let server = Server::start(&model, &["--device", "cuda", "--kv-budget-mib", "4"], &[("LD_LIBRARY_PATH", libs.to_str().unwrap()), ("RESID_KERNEL_CACHE", cache.to_str().unwrap())]);
    // The third request starts from the first one's cached keys and values (all but the
    // prompt's last two tokens): the device's copy of the prefix cache.
    let steered = json!({"directions": dirs, "coef": 3.0, "layers": [1, 2]});
    for (k, (steering, expected)) in [(Value::Null, &want[0]), (steered, &want[1]), (Value::Null, &want[0])].into_iter().enumerate() {
        let mut body = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": true});
        if !steering.is_null() {
            body["steering"] = steering;
        }
        let (s, r) = server.post("/v1/completions", &body);
        assert_eq!(s, 200, "{r}\n{}", server.stderr.lock().unwrap());
        let got = token_ids(&r["choices"][0]);
        // bf16 device activations may flip a near-tie late; the first tokens must agree.
        assert_eq!(got.len(), 6);
        assert_eq!(got[..3], expected.tokens[..3], "cuda (emulator) {got:?} vs cpu {:?}", expected.tokens);
        assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], if k == 2 { 3 } else { 0 });
    }
}

/// The library's `generate_text` (Python's `generate(stop=...)`) ends a sequence at the step its
/// text first holds a stop string, and cuts the text as the server does.
#[test]
fn generate_text_ends_sequences_at_stop_strings_like_the_server() {
    let Some(model) = model_dir() else { return };
    let e = engine();
    let tok = e.model.tokenizer.as_ref().unwrap();
    let prompt = "1, 2, 3, 4,";
    let ids = tok.encode(prompt).unwrap();
    let opts = greedy(24);
    let free = e.generate_text(std::slice::from_ref(&ids), &[None], &opts, &[]).unwrap().remove(0);
    let full = free.text.clone().unwrap();
    assert!(full.contains(" 6"), "{full:?}: pick another stop string");
    let cut = e.generate_text(std::slice::from_ref(&ids), &[None], &opts, &[" 6".to_string()]).unwrap().remove(0);
    assert_eq!(cut.text.as_deref(), Some(&full[..full.find(" 6").unwrap()]));
    assert_eq!(cut.finish, resid::FinishReason::Stop);
    assert!(cut.tokens.len() < free.tokens.len() && cut.tokens[..] == free.tokens[..cut.tokens.len()]);
    let server = Server::start(&model, &[], &[]);
    let (s, r) = server.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [" 6"]}));
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["choices"][0]["text"].as_str(), cut.text.as_deref());
    assert_eq!(token_ids(&r["choices"][0]), cut.tokens);
}

#[test]
fn bad_server_flags_are_one_line_errors() {
    let Some(model) = model_dir() else { return };
    for (flag, value, want) in [("--max-batch-tokens", "1", "--max-batch-tokens 1: must be at least 2"), ("--request-timeout", "0", "--request-timeout 0"), ("--kv-budget-mib", "0", "--kv-budget-mib 0")] {
        let out = Command::new(env!("CARGO_BIN_EXE_resid")).args(["serve", "--model"]).arg(&model).args(["--port", "0", flag, value]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{flag} {value}: {err}");
        assert!(err.contains(want) && err.trim().lines().count() == 1, "{flag} {value}: {err}");
    }
}

/// `layers` names points inside blocks, in `/v1/hidden_states` and in `steering` (vectors from
/// a stored file whose tensors are named by the points): the engine's own results, bit for bit.
#[test]
fn points_inside_blocks_through_the_server() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let (h, g) = (e.hidden_size(), e.steer_geometry());
    let zw = g.heads * g.head_dim;
    let mlp: Vec<f32> = (0..h).map(|i| ((i as f32) * 0.61).sin() * 0.3).collect();
    let z: Vec<f32> = (0..zw).map(|i| ((i as f32) * 0.23).cos() * 0.3).collect();
    let vectors = dir.path().join("vectors");
    std::fs::create_dir_all(&vectors).unwrap();
    write_safetensors(
        &vectors.join("inside.safetensors"),
        &[
            OutTensor { name: "blocks.5.hook_mlp_out".into(), shape: vec![h], data: TensorData::F32(mlp.clone()) },
            OutTensor { name: "blocks.4.hook_z".into(), shape: vec![zw], data: TensorData::F32(z.clone()) },
        ],
        Default::default(),
    )
    .unwrap();
    let server = Server::start(&model, &["--vectors", vectors.to_str().unwrap()], &[]);
    let texts = ["Points inside blocks.", "Another, longer input about attention heads."];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| e.model.tokenizer.as_ref().unwrap().encode(t).unwrap()).collect();
    let targets = resid::engine::steer::parse_steer_targets("blocks.5.hook_mlp_out,blocks.4.hook_z.2-3", g).unwrap();
    let tensors = resid::io::SteeringTensors {
        directions: None,
        points: [("blocks.5.hook_mlp_out".to_string(), Arc::new(mlp)), ("blocks.4.hook_z".to_string(), Arc::new(z))].into_iter().collect(),
    };
    let steer = Arc::new(Steering { coef: 3.0, ..tensors.steering(&targets, g, "test").unwrap() });
    let spec = resid::CaptureSpec {
        points: resid::engine::capture::parse_points("7,blocks.5.hook_mlp_out,blocks.4.hook_z,blocks.2.hook_resid_mid", e.num_layers()).unwrap(),
        position: resid::CapturePosition::Last,
    };
    for steered in [false, true] {
        let s = steered.then(|| steer.clone());
        let want = e.extract(&ids, &spec, &[s.clone(), s], 2048, |_, _| {}).unwrap();
        let mut body = json!({"input": texts, "layers": "7,blocks.5.hook_mlp_out,blocks.4.hook_z,blocks.2.hook_resid_mid", "encoding_format": "float"});
        if steered {
            body["steering"] = json!({"vector": "inside", "coef": 3.0, "layers": ["blocks.5.hook_mlp_out", "blocks.4.hook_z.2-3"]});
        }
        let (s, r) = server.post("/v1/hidden_states", &body);
        assert_eq!(s, 200, "{r}");
        let got: Vec<f32> = r["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got, want.data, "steered: {steered}");
        assert_eq!(r["layers"], json!([7, -2, -2, -2]));
    }
    // Bad points are 400s naming the field.
    for (layers, want) in [("blocks.4.hook_z.99", "out of range"), ("blocks.5.hook_attn_out", "no tensor"), ("blocks.99.hook_mlp_out", "beyond the model")] {
        let body = json!({"input": texts, "steering": {"vector": "inside", "layers": layers}});
        let (s, r) = server.post("/v1/hidden_states", &body);
        assert_eq!(s, 400, "{layers}: {r}");
        assert!(r["error"]["message"].as_str().unwrap().contains(want), "{layers}: {r}");
    }
    let (s, r) = server.post("/v1/hidden_states", &json!({"input": texts, "layers": "blocks.99.hook_z"}));
    assert_eq!(s, 400, "{r}");
}
