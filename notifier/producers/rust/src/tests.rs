//! Unit tests on real ZeroMQ sockets on loopback (`cargo test --offline`); the scenarios
//! against the real relay run from the Python suite (tests/test_producer_kits.py).

use super::*;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A PULL socket standing in for the relay, on a port of its own.
fn relay() -> (zmq::Context, zmq::Socket, String) {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::PULL).unwrap();
    socket.set_linger(0).unwrap();
    socket.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = socket.get_last_endpoint().unwrap().unwrap();
    (context, socket, endpoint)
}

/// The next `count` messages, failing after 30 s without them.
fn receive(socket: &zmq::Socket, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut messages = Vec::new();
    while messages.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(left > Duration::from_millis(0), "only {} of {} arrived", messages.len(), count);
        if socket.poll(zmq::POLLIN, left.as_millis() as i64).unwrap() > 0 {
            messages.push(socket.recv_string(0).unwrap().unwrap());
        }
    }
    messages
}

/// A loopback endpoint nobody listens on.
fn unused_endpoint() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("tcp://{}", probe.local_addr().unwrap())
}

fn payload(n: usize) -> Value {
    serde_json::json!({"content": format!("alert {} \u{1f41f} \"quoted\" \\ back", n)})
}

#[test]
fn the_envelope_is_the_guardians_json_shape() {
    let text = envelope("https://discord.com/api/webhooks/1/tok", &payload(7));
    assert!(text.starts_with(r#"{"type":"NOTIFIER","schema_version":1,"action":"SEND","webhook":"#));
    let parsed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        parsed,
        serde_json::json!({"type": "NOTIFIER", "schema_version": 1, "action": "SEND",
                           "webhook": "https://discord.com/api/webhooks/1/tok",
                           "payload": payload(7)})
    );
}

#[test]
fn a_notifier_can_be_shared_by_threads() {
    fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<Notifier>();
}

#[test]
fn an_endpoint_zeromq_refuses_is_an_error_at_once() {
    assert_eq!(Notifier::new("bogus://x").unwrap_err(), zmq::Error::EPROTONOSUPPORT);
    assert_eq!(Notifier::new("tcp://127.0.0.1").unwrap_err(), zmq::Error::EINVAL);
}

#[test]
fn sent_notifications_arrive_whole_and_in_order() {
    let (_context, pull, endpoint) = relay();
    let notifier = Notifier::new(&endpoint).unwrap();
    for n in 0..100 {
        assert_eq!(notifier.send("https://discord.com/api/webhooks/1/tok", &payload(n)), Sent::Queued);
    }
    let received = receive(&pull, 100);
    for (n, text) in received.iter().enumerate() {
        assert_eq!(text, &envelope("https://discord.com/api/webhooks/1/tok", &payload(n)));
    }
    assert_eq!((notifier.drops(), notifier.errors()), (0, 0));
}

#[test]
fn with_the_relay_down_the_mark_is_queued_the_rest_dropped_and_the_queue_arrives_later() {
    let endpoint = unused_endpoint();
    let notifier = Notifier::new(&endpoint).unwrap();
    let outcomes: Vec<Sent> = (0..10_000).map(|n| notifier.send("w", &payload(n))).collect();
    let queued = outcomes.iter().filter(|&&sent| sent == Sent::Queued).count();
    assert_eq!(queued, SNDHWM as usize);
    assert!(outcomes[..queued].iter().all(|&sent| sent == Sent::Queued));
    assert_eq!((notifier.drops(), notifier.errors()), (10_000 - SNDHWM as u64, 0));

    let context = zmq::Context::new();
    let pull = context.socket(zmq::PULL).unwrap();
    pull.set_linger(0).unwrap();
    pull.bind(&endpoint).unwrap();
    let received = receive(&pull, queued);
    assert_eq!(received[0], envelope("w", &payload(0)));
    assert_eq!(received[queued - 1], envelope("w", &payload(queued - 1)));
    assert_eq!(notifier.send("w", &payload(0)), Sent::Queued);
}

#[test]
fn an_error_resets_the_socket_and_the_next_send_connects_a_new_one() {
    let (_context, pull, endpoint) = relay();
    let notifier = Notifier::new(&endpoint).unwrap();
    // A PULL socket cannot send (ENOTSUP): put one where the PUSH socket was.
    let broken = notifier.context.socket(zmq::PULL).unwrap();
    notifier.lock().socket = Some(broken);

    assert_eq!(notifier.send("w", &payload(1)), Sent::Failed);
    assert_eq!((notifier.drops(), notifier.errors()), (0, 1));
    assert!(notifier.lock().socket.is_none());

    assert_eq!(notifier.send("w", &payload(2)), Sent::Queued);
    assert_eq!(receive(&pull, 1), vec![envelope("w", &payload(2))]);
    assert_eq!(notifier.errors(), 1);
}

#[test]
fn threads_sharing_one_notifier_lose_and_garble_nothing() {
    let (_context, pull, endpoint) = relay();
    let notifier = Arc::new(Notifier::new(&endpoint).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let notifier = Arc::clone(&notifier);
            std::thread::spawn(move || {
                (0..250).filter(|n| notifier.send("w", &payload(t * 1000 + n)) == Sent::Queued).count()
            })
        })
        .collect();
    let queued: usize = threads.into_iter().map(|thread| thread.join().unwrap()).sum();
    assert_eq!(queued, 1000);
    let received: HashSet<String> = receive(&pull, 1000).into_iter().collect();
    let expected: HashSet<String> = (0..4)
        .flat_map(|t| (0..250).map(move |n| envelope("w", &payload(t * 1000 + n))))
        .collect();
    assert_eq!(received, expected);
}

fn certificate(path: &Path, public: &str, secret: Option<&str>, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let mut text = format!("#   ZeroMQ CURVE Certificate\n\nmetadata\ncurve\n    public-key = \"{}\"\n", public);
    if let Some(secret) = secret {
        text += &format!("    secret-key = \"{}\"\n", secret);
    }
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn scratch(name: &str) -> std::path::PathBuf {
    let directory = std::env::temp_dir().join(format!("swimmy-kit-{}-{}", name, std::process::id()));
    fs::create_dir_all(&directory).unwrap();
    directory
}

#[test]
fn with_curve_keys_from_certificates_the_relay_gets_the_notification_encrypted() {
    let server = zmq::CurveKeyPair::new().unwrap();
    let client = zmq::CurveKeyPair::new().unwrap();
    let z85 = |key: &[u8]| zmq::z85_encode(key).unwrap();
    let directory = scratch("curve");
    certificate(&directory.join("relay.key"), &z85(&server.public_key), None, 0o644);
    certificate(&directory.join("guardian.key_secret"), &z85(&client.public_key),
                Some(&z85(&client.secret_key)), 0o600);
    let keys = CurveKeys::from_certificates(directory.join("relay.key"),
                                            directory.join("guardian.key_secret")).unwrap();
    assert_eq!(keys.secret, z85(&client.secret_key));
    assert!(!format!("{:?}", keys).contains(&keys.secret));

    let context = zmq::Context::new();
    let pull = context.socket(zmq::PULL).unwrap();
    pull.set_linger(0).unwrap();
    pull.set_curve_server(true).unwrap();
    pull.set_curve_secretkey(&server.secret_key).unwrap();
    pull.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = pull.get_last_endpoint().unwrap().unwrap();
    let notifier = Notifier::with_curve(&endpoint, keys).unwrap();
    assert_eq!(notifier.send("w", &payload(3)), Sent::Queued);
    assert_eq!(receive(&pull, 1), vec![envelope("w", &payload(3))]);
    fs::remove_dir_all(directory).unwrap();
}

#[test]
fn a_secret_certificate_others_can_read_is_refused() {
    let directory = scratch("loose");
    let client = zmq::CurveKeyPair::new().unwrap();
    let z85 = |key: &[u8]| zmq::z85_encode(key).unwrap();
    certificate(&directory.join("relay.key"), &z85(&client.public_key), None, 0o644);
    certificate(&directory.join("guardian.key_secret"), &z85(&client.public_key),
                Some(&z85(&client.secret_key)), 0o640);
    let error = CurveKeys::from_certificates(directory.join("relay.key"),
                                             directory.join("guardian.key_secret")).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::PermissionDenied);
    assert!(error.to_string().contains("chmod 600"), "{}", error);
    certificate(&directory.join("public.key"), &z85(&client.public_key), None, 0o600);
    let missing = CurveKeys::from_certificates(directory.join("relay.key"), directory.join("public.key"))
        .unwrap_err();
    assert_eq!(missing.kind(), io::ErrorKind::InvalidData); // a public certificate has no secret
    assert!(missing.to_string().ends_with("holds no secret-key"), "{}", missing);
    fs::remove_dir_all(directory).unwrap();
}
