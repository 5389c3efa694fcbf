//! Reads one JSON command a line and answers each with one JSON line:
//!
//! - `{"op": "new", "endpoint": E}` (or `"from_env"`, or `"new_curve"` with
//!   `server_certificate` and `secret_certificate` paths): make the notifier
//!   (`{"error": ...}` if refused); it is dropped at the end of the input (waiting at
//!   most the linger);
//! - `{"op": "send", "webhook": W, "payloads": [...]}`: send each, answer the outcomes
//!   counted and the notifier's counters;
//! - `{"op": "threads", "webhook": W, "payloads": [[...], ...]}`: one thread per list;
//! - `{"op": "bench", "webhook": W, "payload": P, "count": N, "bare": B}`: time N sends
//!   (with `bare`, on a plain PUSH socket with the same options instead of the kit).

use std::io::{self, BufRead, Write};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use swimmy_notifier_producer::{envelope, CurveKeys, Notifier, Sent, LINGER_MS, SNDHWM};

fn counts(outcomes: &[Sent], notifier: &Notifier) -> Value {
    let count = |kind| outcomes.iter().filter(|&&sent| sent == kind).count();
    json!({"queued": count(Sent::Queued), "dropped": count(Sent::Dropped),
           "failed": count(Sent::Failed), "drops": notifier.drops(), "errors": notifier.errors()})
}

fn percentiles(mut nanos: Vec<u128>) -> Value {
    nanos.sort_unstable();
    let at = |q: f64| nanos[((nanos.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    json!({"p50_us": at(0.5), "p99_us": at(0.99), "max_us": at(1.0)})
}

fn bench(command: &Value, notifier: &Option<Arc<Notifier>>) -> Value {
    let webhook = command["webhook"].as_str().unwrap();
    let payload = &command["payload"];
    let count = command["count"].as_u64().unwrap() as usize;
    let mut nanos = Vec::with_capacity(count);
    if command["bare"].as_bool().unwrap_or(false) {
        let context = zmq::Context::new();
        let socket = context.socket(zmq::PUSH).unwrap();
        socket.set_sndhwm(SNDHWM).unwrap();
        socket.set_linger(LINGER_MS).unwrap();
        socket.connect(command["endpoint"].as_str().unwrap()).unwrap();
        let message = envelope(webhook, payload);
        for _ in 0..count {
            let started = Instant::now();
            let _ = socket.send(message.as_bytes(), zmq::DONTWAIT);
            nanos.push(started.elapsed().as_nanos());
        }
    } else {
        let notifier = notifier.as_ref().unwrap();
        for _ in 0..count {
            let started = Instant::now();
            notifier.send(webhook, payload);
            nanos.push(started.elapsed().as_nanos());
        }
    }
    percentiles(nanos)
}

fn answer(command: &Value, notifier: &mut Option<Arc<Notifier>>) -> Value {
    match command["op"].as_str().unwrap_or("") {
        "new" | "from_env" | "new_curve" => {
            let endpoint = command["endpoint"].as_str().unwrap_or("");
            let made = match command["op"].as_str().unwrap() {
                "new" => Notifier::new(endpoint),
                "from_env" => Notifier::from_env(),
                _ => {
                    let keys = CurveKeys::from_certificates(
                        command["server_certificate"].as_str().unwrap(),
                        command["secret_certificate"].as_str().unwrap(),
                    );
                    match keys {
                        Ok(keys) => Notifier::with_curve(endpoint, keys),
                        Err(error) => return json!({"error": error.to_string()}),
                    }
                }
            };
            match made {
                Ok(made) => {
                    let endpoint = made.endpoint().to_string();
                    *notifier = Some(Arc::new(made));
                    json!({"endpoint": endpoint})
                }
                Err(error) => json!({"error": error.to_string()}),
            }
        }
        "send" => {
            let notifier = notifier.as_ref().unwrap();
            let webhook = command["webhook"].as_str().unwrap();
            let outcomes: Vec<Sent> = command["payloads"].as_array().unwrap().iter()
                .map(|payload| notifier.send(webhook, payload)).collect();
            counts(&outcomes, notifier)
        }
        "threads" => {
            let notifier = notifier.as_ref().unwrap();
            let webhook = command["webhook"].as_str().unwrap().to_string();
            let threads: Vec<_> = command["payloads"].as_array().unwrap().iter().cloned()
                .map(|payloads| {
                    let (notifier, webhook) = (Arc::clone(notifier), webhook.clone());
                    std::thread::spawn(move || -> Vec<Sent> {
                        payloads.as_array().unwrap().iter()
                            .map(|payload| notifier.send(&webhook, payload)).collect()
                    })
                })
                .collect();
            let outcomes: Vec<Sent> = threads.into_iter()
                .flat_map(|thread| thread.join().unwrap()).collect();
            counts(&outcomes, notifier)
        }
        "bench" => bench(command, notifier),
        other => json!({"error": format!("unknown op {:?}", other)}),
    }
}

fn main() {
    let mut notifier: Option<Arc<Notifier>> = None;
    let stdout = io::stdout();
    for line in io::stdin().lock().lines() {
        let command: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let reply = answer(&command, &mut notifier);
        let mut out = stdout.lock();
        writeln!(out, "{}", reply).unwrap();
        out.flush().unwrap();
    }
}
