//! A small client of the REST API, for `mainstay ctl` and the tests.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::Duration;

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    authorization: Option<String>,
    timeout: Duration,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// An answer: the status code and the body (JSON when it parses, else text).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub text: String,
}

impl ApiClient {
    /// `base` is e.g. `http://127.0.0.1:8008` (a trailing `/` is ignored).
    pub fn new(base: &str) -> ApiClient {
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            authorization: None,
            timeout: Duration::from_secs(10),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    /// HTTP basic authentication for unsafe methods.
    pub fn with_basic_auth(mut self, user: &str, password: &str) -> ApiClient {
        use base64::Engine;
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.authorization = Some(format!("Basic {encoded}"));
        self
    }

    /// A bearer token for unsafe methods.
    pub fn with_token(mut self, token: &str) -> ApiClient {
        self.authorization = Some(format!("Bearer {token}"));
        self
    }

    pub async fn get(&self, path: &str) -> Result<Answer, String> {
        self.request(Method::GET, path, None).await
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, String> {
        let raw = body.map(|b| b.to_string().into_bytes());
        self.raw(method, path, raw, "application/json").await
    }

    /// Sends `body` as is (tests send malformed JSON with it).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &str,
    ) -> Result<Answer, String> {
        let url = format!("{}{path}", self.base);
        let mut builder = Request::builder().method(method.clone()).uri(&url);
        if let Some(auth) = &self.authorization {
            builder = builder.header(hyper::header::AUTHORIZATION, auth);
        }
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, content_type);
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| format!("{method} {url}: {}", error_chain(&e)))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{method} {url}: reading the answer: {e}"))?
                .to_bytes();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Ok(Answer { status, body, text })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("{method} {url}: no answer within {:?}", self.timeout))?
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
