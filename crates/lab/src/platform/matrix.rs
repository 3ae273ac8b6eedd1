//! The Matrix client the platform lab uses, as crew devices would: it
//! registers, creates a room and sends messages through one address (the
//! VIP); a send that fails is retried with the same transaction id, so the
//! homeserver can tell a retry from a new message.

use hyper::{Method, StatusCode};
use mainstay_agent::api_client::ApiClient;
use mainstay_core::poison;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Matrix {
    client: ApiClient,
}

/// What a sender saw.
#[derive(Default, Clone)]
pub struct SendLog {
    /// Each acknowledged message: its number and when its answer came.
    pub acked: Vec<(u64, Instant)>,
    /// Requests that got no 200 (timeouts, refused connections, errors),
    /// each retried.
    pub failed_requests: u64,
}

/// What the room holds, read back after the run.
pub struct RoomCheck {
    /// Acknowledged messages not in the room.
    pub lost: Vec<u64>,
    /// Messages in the room more than once (extra copies).
    pub duplicates: u64,
    /// Messages in the room.
    pub messages: usize,
}

fn error(what: &str, answer: Result<mainstay_agent::api_client::Answer, impl ToString>) -> String {
    match answer {
        Ok(answer) => format!("{what}: HTTP {}: {}", answer.status, answer.text),
        Err(e) => format!("{what}: {}", e.to_string()),
    }
}

/// `key` of a 200 answer's JSON body, as a string; else what went wrong.
fn string_field(
    answer: Result<mainstay_agent::api_client::Answer, mainstay_agent::api_client::ClientError>,
    key: &str,
    what: &str,
) -> Result<String, String> {
    if let Ok(a) = &answer
        && a.status == StatusCode::OK
        && let Some(value) = a.body[key].as_str()
    {
        return Ok(value.to_string());
    }
    Err(error(what, answer))
}

impl Matrix {
    /// Registers `user` (no verification: the lab's homeserver allows it)
    /// on the homeserver at `base`, e.g. `http://10.213.0.50:18088`.
    pub async fn register(base: &str, user: &str, password: &str) -> Result<Matrix, String> {
        let anonymous = ApiClient::new(base).with_timeout(Duration::from_secs(10));
        let body = json!({
            "username": user,
            "password": password,
            "auth": { "type": "m.login.dummy" },
        });
        let answer = anonymous
            .request(Method::POST, "/_matrix/client/v3/register", Some(&body))
            .await;
        let token = match &answer {
            Ok(a) if a.status == StatusCode::OK => {
                a.body["access_token"].as_str().map(String::from)
            }
            _ => None,
        };
        let Some(token) = token else {
            return Err(error("registering", answer));
        };
        Ok(Matrix {
            client: ApiClient::new(base)
                .with_token(&token)
                .with_timeout(Duration::from_secs(1)),
        })
    }

    /// A client with another request timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Matrix {
        Matrix {
            client: self.client.clone().with_timeout(timeout),
        }
    }

    pub async fn create_room(&self, name: &str) -> Result<String, String> {
        let answer = self
            .with_timeout(Duration::from_secs(10))
            .client
            .request(
                Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(&json!({ "name": name, "preset": "private_chat" })),
            )
            .await;
        string_field(answer, "room_id", "creating a room")
    }

    /// Sends message `n` ("message n", transaction id "txn-n"); Ok when the
    /// homeserver answered with an event id.
    pub async fn send(&self, room: &str, n: u64) -> Result<String, String> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/txn-{n}",
            encode(room)
        );
        let body = json!({ "msgtype": "m.text", "body": format!("message {n}") });
        let answer = self.client.request(Method::PUT, &path, Some(&body)).await;
        string_field(answer, "event_id", "sending")
    }

    /// Uploads `bytes` as a PNG image; its `mxc://` URI.
    pub async fn upload(&self, name: &str, bytes: &[u8]) -> Result<String, String> {
        let answer = self
            .with_timeout(Duration::from_secs(10))
            .client
            .raw(
                Method::POST,
                &format!("/_matrix/media/v3/upload?filename={}", encode(name)),
                Some(bytes.to_vec()),
                "image/png",
            )
            .await;
        string_field(answer, "content_uri", "uploading")
    }

    /// The bytes of `mxc://server/id`, through the authenticated media API.
    pub async fn download(&self, mxc: &str) -> Result<Vec<u8>, String> {
        use http_body_util::BodyExt;
        let rest = mxc
            .strip_prefix("mxc://")
            .ok_or_else(|| format!("{mxc} is not an mxc:// URI"))?;
        let path = format!("/_matrix/client/v1/media/download/{rest}");
        let response = self
            .with_timeout(Duration::from_secs(10))
            .client
            .response(Method::GET, &path, None, "")
            .await
            .map_err(|e| format!("downloading {mxc}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("downloading {mxc}: {e}"))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(format!(
                "downloading {mxc}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(body.to_vec())
    }

    /// The TURN servers the homeserver hands this user.
    pub async fn turn_servers(&self) -> Result<Vec<String>, String> {
        let answer = self.client.get("/_matrix/client/v3/voip/turnServer").await;
        match &answer {
            Ok(a) if a.status == StatusCode::OK => Ok(a.body["uris"]
                .as_array()
                .map(|uris| {
                    uris.iter()
                        .filter_map(|u| u.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()),
            _ => Err(error("asking for TURN servers", answer)),
        }
    }

    /// Every `message N` in the room, oldest first, read back page by page
    /// (bounded: at most 1,000 pages of 1,000 events).
    pub async fn room_messages(&self, room: &str) -> Result<Vec<u64>, String> {
        let client = self.with_timeout(Duration::from_secs(20));
        let filter = encode(r#"{"types":["m.room.message"]}"#);
        let mut from: Option<String> = None;
        let mut numbers = Vec::new();
        for _ in 0..1000 {
            let mut path = format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=f&limit=1000&filter={filter}",
                encode(room)
            );
            if let Some(token) = &from {
                path.push_str(&format!("&from={}", encode(token)));
            }
            let answer = client.client.get(&path).await;
            let page = match &answer {
                Ok(a) if a.status == StatusCode::OK => a.body.clone(),
                _ => return Err(error("reading the room", answer)),
            };
            let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
            numbers.extend(chunk.iter().filter_map(|event| {
                event["content"]["body"]
                    .as_str()?
                    .strip_prefix("message ")?
                    .parse::<u64>()
                    .ok()
            }));
            match page["end"].as_str() {
                Some(end) if !chunk.is_empty() => from = Some(end.to_string()),
                _ => return Ok(numbers),
            }
        }
        Err("reading the room: more than 1,000 pages".into())
    }

    /// Compares the room with what was acknowledged.
    pub async fn check_room(&self, room: &str, log: &SendLog) -> Result<RoomCheck, String> {
        let numbers = self.room_messages(room).await?;
        let mut copies: BTreeMap<u64, u64> = BTreeMap::new();
        for n in &numbers {
            *copies.entry(*n).or_default() += 1;
        }
        Ok(RoomCheck {
            lost: log
                .acked
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| !copies.contains_key(n))
                .collect(),
            duplicates: copies.values().map(|c| c - 1).sum(),
            messages: numbers.len(),
        })
    }
}

/// Percent-encodes everything but unreserved characters (room ids hold
/// `!` and `:`, tokens and filters more).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Messages sent one after another, about 20 a second, in the background.
pub struct Sender {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<SendLog>>,
    task: tokio::task::JoinHandle<()>,
}

/// One message every 50 ms, or as soon as the previous answer comes when
/// it is slower; each request waits at most a second.
const SEND_EVERY: Duration = Duration::from_millis(50);

impl Sender {
    pub fn start(matrix: &Matrix, room: &str) -> Sender {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(SendLog::default()));
        let (matrix, room) = (matrix.clone(), room.to_string());
        let (stopping, logging) = (stop.clone(), log.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SEND_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 1;
            while !stopping.load(Ordering::Relaxed) {
                tick.tick().await;
                match matrix.send(&room, n).await {
                    Ok(_) => {
                        poison::lock(&logging).acked.push((n, Instant::now()));
                        n += 1;
                    }
                    Err(_) => poison::lock(&logging).failed_requests += 1,
                }
            }
        });
        Sender { stop, log, task }
    }

    /// The first acknowledgement after `after`, if any yet.
    pub fn first_ack_after(&self, after: Instant) -> Option<Instant> {
        poison::lock(&self.log)
            .acked
            .iter()
            .map(|(_, at)| *at)
            .find(|at| *at > after)
    }

    /// Stops after the request in flight and returns the log.
    pub async fn finish(self) -> SendLog {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        poison::lock(&self.log).clone()
    }
}
