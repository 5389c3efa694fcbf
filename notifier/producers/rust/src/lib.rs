//! Hand notifications to the swimmy-notifier relay over ZeroMQ without ever blocking.
//!
//! The guardian keeps one [`Notifier`] (a PUSH socket connected to the relay's PULL
//! socket) and calls [`Notifier::send`] for each alert. Every send uses `zmq::DONTWAIT`:
//! while the relay is down or slow, ZeroMQ holds up to the high-water mark (1000) and
//! delivers them when it is back (`ZMQ_IMMEDIATE` is not set, so a relay restart loses
//! nothing below the mark); beyond it, each notification is dropped and counted
//! ([`Notifier::drops`]). Any other ZeroMQ error is counted ([`Notifier::errors`]) and
//! the socket closed, so that the next send connects a new one. Nothing here panics or
//! blocks the caller, except dropping the `Notifier`, which gives queued notifications
//! at most the linger (500 ms) to leave.
//!
//! Each notification is one envelope in the guardian's JSON shape:
//! `{"type":"NOTIFIER","schema_version":1,"action":"SEND","webhook":...,"payload":{...}}`.
//!
//! One `Notifier` may be shared by any number of threads (it is `Send + Sync`): a mutex
//! guards the socket, held only for one non-blocking send.
//!
//! For a relay on another host, [`Notifier::with_curve`] makes the socket a CURVE client
//! with keys from the certificates `python -m notifier keygen` writes
//! ([`CurveKeys::from_certificates`]).

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

/// Notifications ZeroMQ holds for a relay that is down or slow.
pub const SNDHWM: i32 = 1000;

/// How long dropping a `Notifier` lets queued notifications reach the relay: bounded,
/// so that a dead relay never holds up the guardian's exit.
pub const LINGER_MS: i32 = 500;

/// What became of one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Handed to ZeroMQ, which delivers it to the relay (now, or once it is back).
    Queued,
    /// The high-water mark was full (the relay is down or far behind): dropped, counted.
    Dropped,
    /// Another ZeroMQ error: counted, and the socket is reset for the next send.
    Failed,
}

/// CURVE keys, each the 40-character Z85 text `python -m notifier keygen` prints.
#[derive(Clone)]
pub struct CurveKeys {
    /// The relay's public key.
    pub server_public: String,
    /// This producer's public key.
    pub public: String,
    /// This producer's secret key.
    pub secret: String,
}

impl CurveKeys {
    /// The keys in the relay's public certificate (`relay.key`) and this producer's
    /// secret certificate (`NAME.key_secret`), as `python -m notifier keygen` writes them.
    /// A secret certificate that group or others may read or write is refused, as ssh
    /// refuses a loose key.
    pub fn from_certificates<P: AsRef<Path>, Q: AsRef<Path>>(
        server_certificate: P,
        secret_certificate: Q,
    ) -> io::Result<CurveKeys> {
        let secret_path = secret_certificate.as_ref();
        refuse_loose(secret_path)?;
        let server = fs::read_to_string(server_certificate.as_ref())?;
        let ours = fs::read_to_string(secret_path)?;
        Ok(CurveKeys {
            server_public: certificate_key(&server, "public-key", server_certificate.as_ref())?,
            public: certificate_key(&ours, "public-key", secret_path)?,
            secret: certificate_key(&ours, "secret-key", secret_path)?,
        })
    }
}

impl fmt::Debug for CurveKeys {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("CurveKeys")
            .field("server_public", &self.server_public)
            .field("public", &self.public)
            .field("secret", &"<hidden>")
            .finish()
    }
}

#[cfg(unix)]
fn refuse_loose(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "secret certificate {} has mode {:04o}: group and others must not read or \
                 write it (chmod 600 {})",
                path.display(),
                mode & 0o7777,
                path.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn refuse_loose(_path: &Path) -> io::Result<()> {
    Ok(())
}

/// The value of `name = "..."` in a ZeroMQ certificate.
fn certificate_key(text: &str, name: &str, path: &Path) -> io::Result<String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.trim().split_once('=')?;
            if key.trim() == name {
                Some(value.trim().trim_matches('"').to_string())
            } else {
                None
            }
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} holds no {}", path.display(), name),
            )
        })
}

/// The canonical envelope for `payload` (a Discord message object), in the guardian's
/// JSON shape and key order.
pub fn envelope(webhook: &str, payload: &Value) -> String {
    format!(
        r#"{{"type":"NOTIFIER","schema_version":1,"action":"SEND","webhook":{},"payload":{}}}"#,
        Value::from(webhook),
        payload
    )
}

/// `tcp://$SWIMMY_ZMQ_HOST:$SWIMMY_PORT_NOTIFIER` (127.0.0.1 and 5562 when unset or
/// empty), as the guardian and the Lisp core build it.
pub fn endpoint_from_env() -> String {
    let var = |name: &str, default: &str| match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => default.to_string(),
    };
    format!(
        "tcp://{}:{}",
        var("SWIMMY_ZMQ_HOST", "127.0.0.1"),
        var("SWIMMY_PORT_NOTIFIER", "5562")
    )
}

struct State {
    socket: Option<zmq::Socket>,
    dropping: bool, // since the last drop, nothing was queued
}

/// A non-blocking producer connected to the relay: see the crate documentation.
pub struct Notifier {
    endpoint: String,
    curve: Option<CurveKeys>,
    context: zmq::Context,
    state: Mutex<State>,
    drops: AtomicU64,
    errors: AtomicU64,
}

impl Notifier {
    /// Connect to the relay at `endpoint` (connecting does not wait for it). An endpoint
    /// ZeroMQ refuses (`bogus://x`, `tcp://host` without a port) is an error here.
    pub fn new(endpoint: &str) -> Result<Notifier, zmq::Error> {
        Notifier::open(endpoint, None)
    }

    /// [`Notifier::new`] with [`endpoint_from_env`]: the variables the Lisp kit reads.
    pub fn from_env() -> Result<Notifier, zmq::Error> {
        Notifier::new(&endpoint_from_env())
    }

    /// [`Notifier::new`] as a CURVE client: encrypted, and admitted by a relay whose
    /// clients directory holds this producer's public certificate.
    pub fn with_curve(endpoint: &str, keys: CurveKeys) -> Result<Notifier, zmq::Error> {
        Notifier::open(endpoint, Some(keys))
    }

    fn open(endpoint: &str, curve: Option<CurveKeys>) -> Result<Notifier, zmq::Error> {
        let notifier = Notifier {
            endpoint: endpoint.to_string(),
            curve,
            context: zmq::Context::new(),
            state: Mutex::new(State { socket: None, dropping: false }),
            drops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        };
        let socket = notifier.connect()?;
        notifier.lock().socket = Some(socket);
        Ok(notifier)
    }

    /// A new PUSH socket connected in the background to the endpoint.
    fn connect(&self) -> Result<zmq::Socket, zmq::Error> {
        let socket = self.context.socket(zmq::PUSH)?;
        let setup = || -> Result<(), zmq::Error> {
            socket.set_sndhwm(SNDHWM)?;
            socket.set_linger(LINGER_MS)?;
            if let Some(keys) = &self.curve {
                socket.set_curve_serverkey(keys.server_public.as_bytes())?;
                socket.set_curve_publickey(keys.public.as_bytes())?;
                socket.set_curve_secretkey(keys.secret.as_bytes())?;
            }
            socket.connect(&self.endpoint)
        };
        match setup() {
            Ok(()) => Ok(socket),
            Err(error) => {
                let _ = socket.set_linger(0);
                Err(error)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding it left nothing half-done: go on.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queue `payload` for `webhook`; never blocks, never panics.
    pub fn send(&self, webhook: &str, payload: &Value) -> Sent {
        let message = envelope(webhook, payload);
        let (sent, note) = {
            let mut state = self.lock();
            let result = match state.socket.take() {
                Some(socket) => Ok(socket),
                None => self.connect(),
            }
            .and_then(|socket| {
                let outcome = send_once(&socket, message.as_bytes());
                state.socket = Some(socket);
                outcome
            });
            self.settle(&mut state, result)
        };
        if let Some(note) = note {
            // outside the lock: standard error may block
            eprintln!("swimmy-notifier-producer: {}", note);
        }
        sent
    }

    /// Count the outcome of one send; reset the socket after an error. Returns it, with
    /// a line worth logging when the relay's state changed.
    fn settle(&self, state: &mut State, result: Result<(), zmq::Error>) -> (Sent, Option<String>) {
        match result {
            Ok(()) => {
                let note = if state.dropping {
                    state.dropping = false;
                    Some(format!(
                        "the relay at {} takes notifications again ({} dropped in all)",
                        self.endpoint,
                        self.drops()
                    ))
                } else {
                    None
                };
                (Sent::Queued, note)
            }
            Err(zmq::Error::EAGAIN) => {
                self.drops.fetch_add(1, Ordering::Relaxed);
                let note = if state.dropping {
                    None
                } else {
                    state.dropping = true;
                    Some(format!(
                        "the relay at {} is not taking notifications (high-water mark of {} \
                         reached): dropping them",
                        self.endpoint, SNDHWM
                    ))
                };
                (Sent::Dropped, note)
            }
            Err(error) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if let Some(socket) = state.socket.take() {
                    let _ = socket.set_linger(0);
                }
                let note = format!(
                    "sending to {} failed ({}); reconnecting on the next send",
                    self.endpoint, error
                );
                (Sent::Failed, Some(note))
            }
        }
    }

    /// Notifications dropped because the high-water mark was full.
    pub fn drops(&self) -> u64 {
        self.drops.load(Ordering::Relaxed)
    }

    /// Sends that failed with another ZeroMQ error (each reset the socket).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The relay's endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("endpoint", &self.endpoint)
            .field("curve", &self.curve.is_some())
            .field("drops", &self.drops())
            .field("errors", &self.errors())
            .finish()
    }
}

/// One non-blocking send; an interrupted call (a signal arrived) is simply made again.
fn send_once(socket: &zmq::Socket, message: &[u8]) -> Result<(), zmq::Error> {
    loop {
        match socket.send(message, zmq::DONTWAIT) {
            Err(zmq::Error::EINTR) => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests;
