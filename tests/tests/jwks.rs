//! JWT keys from a JWK Set (`[auth] jwks_url`), against a key server the test runs: keys
//! chosen by `kid`, rotation, an unknown-kid flood, the key server down, a wrong algorithm,
//! and no start without a first set.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use gateway::{Config, Server};
use gateway_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The test ES256 key's public half as a JWK with each of `kids`.
fn set_with(kids: &[&str]) -> String {
    let set: Value = serde_json::from_slice(&std::fs::read(fixture("jwks.json")).unwrap()).unwrap();
    let keys: Vec<Value> = kids
        .iter()
        .map(|kid| {
            let mut key = set["keys"][1].clone();
            key["kid"] = json!(kid);
            key
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

fn token(kid: &str, alg: Algorithm) -> String {
    let key = match alg {
        Algorithm::RS256 => {
            EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwt-rs256-private.pem")).unwrap())
        }
        _ => EncodingKey::from_ec_pem(&std::fs::read(fixture("jwt-es256-private.pem")).unwrap()),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    encode(&header, &json!({"sub": "u", "exp": exp}), &key).unwrap()
}

/// A key server: answers every request with the current set, and counts the requests.
struct KeyServer {
    port: u16,
    set: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl KeyServer {
    async fn start(set: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let set = Arc::new(Mutex::new(set));
        let requests = Arc::new(AtomicUsize::new(0));
        let (served, count) = (set.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let body = served.lock().unwrap().clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        Self {
            port,
            set,
            requests,
            task,
        }
    }

    fn serve(&self, set: String) {
        *self.set.lock().unwrap() = set;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn config(port: u16) -> String {
    format!(
        "[auth]\nalgorithm = \"ES256\"\njwks_url = \"http://127.0.0.1:{port}/jwks.json\"\n\
         [[endpoint]]\npath = \"/chat\"\n\
         [[endpoint]]\npath = \"/fm\"\nauth = \"first-message\"\n"
    )
}

async fn admitted(gw: &TestGateway, kid: &str, alg: Algorithm) -> Result<(), Option<u16>> {
    match gw.ws(&format!("/chat?token={}", token(kid, alg))).await {
        Ok(mut c) => {
            let welcome = c.recv().await;
            assert_eq!(welcome["type"], "welcome", "{welcome}");
            Ok(())
        }
        Err(e) => Err(http_status(&e)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_come_from_the_set_by_kid_rotate_and_survive_the_key_server() {
    within(90, async {
        let keys = KeyServer::start(set_with(&["k1", "k2"])).await;
        let gw = TestGateway::start(&config(keys.port)).await;
        assert_eq!(keys.requests(), 1, "fetched once at start");
        assert_eq!(admitted(&gw, "k1", Algorithm::ES256).await, Ok(()));
        assert_eq!(admitted(&gw, "k2", Algorithm::ES256).await, Ok(()));
        assert_eq!(
            admitted(&gw, "k1", Algorithm::RS256).await,
            Err(Some(401)),
            "another algorithm is refused, whatever its kid"
        );

        // The key server rotates to k3. Within 10 s of the last fetch an unknown kid is
        // refused without a fetch; after that, the first one refetches and is admitted.
        keys.serve(set_with(&["k3"]));
        assert_eq!(admitted(&gw, "k3", Algorithm::ES256).await, Err(Some(401)));
        assert_eq!(keys.requests(), 1, "no refetch within 10 s of the last");
        tokio::time::sleep(Duration::from_millis(10_200)).await;
        assert_eq!(admitted(&gw, "k3", Algorithm::ES256).await, Ok(()));
        assert_eq!(keys.requests(), 2, "one refetch");
        assert_eq!(
            admitted(&gw, "k1", Algorithm::ES256).await,
            Err(Some(401)),
            "the rotated-out key is gone"
        );

        // The key server rotates to k4. A first-message `auth` with it is refused at once,
        // and starts the refetch that serves the next attempt.
        keys.serve(set_with(&["k4"]));
        tokio::time::sleep(Duration::from_millis(10_200)).await;
        let mut c = gw.ws("/fm").await.unwrap();
        let auth =
            |id: u32| json!({"type": "auth", "id": id, "token": token("k4", Algorithm::ES256)});
        let refused = c.request(auth(1)).await;
        assert_eq!(refused["code"], "unauthorized", "{refused}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while keys.requests() < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(keys.requests(), 3, "the refused auth started one refetch");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(c.request(auth(2)).await, json!({"type": "ack", "id": 2}));
        assert_eq!(c.recv().await["type"], "welcome");

        // A flood of unknown kids costs no more fetches (the last one was just now).
        for i in 0..50 {
            let kid = format!("nope-{i}");
            assert_eq!(admitted(&gw, &kid, Algorithm::ES256).await, Err(Some(401)));
        }
        assert_eq!(keys.requests(), 3, "a flood of unknown kids: no fetch");

        // `/api/tickets` with a rotated kid waits for the refetch, as an upgrade does.
        keys.serve(set_with(&["k5"]));
        tokio::time::sleep(Duration::from_millis(10_200)).await;
        let bearer = format!("Bearer {}", token("k5", Algorithm::ES256));
        let (status, body) = gw
            .https("POST", "/api/tickets", &[("Authorization", &bearer)], "")
            .await;
        assert_eq!(status, 200, "{body}, {} fetches", keys.requests());
        assert_eq!(keys.requests(), 4, "one refetch");

        // The key server goes away: the last good set stays.
        keys.task.abort();
        tokio::time::sleep(Duration::from_millis(10_200)).await;
        assert_eq!(
            admitted(&gw, "nope", Algorithm::ES256).await,
            Err(Some(401))
        );
        assert_eq!(
            admitted(&gw, "k5", Algorithm::ES256).await,
            Ok(()),
            "the last good set serves while the key server is down"
        );
        let (status, text) = gw.https("GET", "/metrics", &[], "").await;
        assert_eq!(status, 200);
        for line in [
            r#"gateway_jwks_fetches_total{result="ok"} 4"#,
            r#"gateway_jwks_fetches_total{result="error"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_start_without_a_first_set_and_bad_settings_are_named() {
    within(30, async {
        // A port nobody listens on.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let text = format!("listen = \"127.0.0.1:0\"\n{}", config(port));
        let config = Config::from_toml(&text, dir.path()).expect("valid config");
        let Err(err) = Server::start(config).await else {
            panic!("no start without a set")
        };
        assert!(err.to_string().contains("jwks.json"), "{err}");

        let keys = KeyServer::start("{\"keys\": []}".into()).await;
        let text = format!("listen = \"127.0.0.1:0\"\n{}", self::config(keys.port));
        let config = Config::from_toml(&text, dir.path()).expect("valid config");
        let Err(err) = Server::start(config).await else {
            panic!("no start on an empty set")
        };
        assert!(err.to_string().contains("no key"), "{err}");

        for (toml, key) in [
            (
                "[auth]\nalgorithm = \"HS256\"\nsecret = \"0123456789abcdef\"\njwks_url = \"http://127.0.0.1:1/\"\n",
                "auth.jwks_url",
            ),
            (
                "[auth]\nalgorithm = \"ES256\"\njwks_url = \"http://id.example/jwks.json\"\n",
                "auth.jwks_url",
            ),
            (
                "[auth]\nalgorithm = \"ES256\"\npublic_key = \"x.pem\"\njwks_refresh_secs = 60\n",
                "auth.jwks_refresh_secs",
            ),
            (
                "[auth]\nalgorithm = \"ES256\"\njwks_url = \"https://id.example/jwks.json\"\npublic_key = \"x.pem\"\n",
                "auth.jwks_url",
            ),
        ] {
            let Err(err) = Config::from_toml(toml, dir.path()) else {
                panic!("{toml}: accepted")
            };
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    })
    .await;
}
