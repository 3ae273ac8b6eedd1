//! A small client of the REST API, for `mainstay ctl` and the tests.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::time::Duration;

/// One connection per request: ctl and the agents send a handful, and a
/// fresh connection never meets a server-side idle timeout.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    authorization: Option<String>,
    timeout: Duration,
    tls: Option<tokio_rustls::TlsConnector>,
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
            tls: None,
        }
    }

    /// Trust the CA certificates in `ca_file` for https:// URLs.
    pub fn with_ca_file(mut self, ca_file: &std::path::Path) -> Result<ApiClient, String> {
        self.tls = Some(crate::tls::connector(ca_file)?);
        Ok(self)
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
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("{url} is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "{url}: only http:// and https:// URLs are supported"
                ));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("{url} has no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| host.clone());
        let tls = match (https, &self.tls) {
            (true, None) => {
                return Err(format!(
                    "{url} uses https: give the CA that signed the API's certificate \
                     (--ca-file, or api.ca_file in the configuration)"
                ));
            }
            (true, Some(tls)) => Some(tls.clone()),
            (false, _) => None,
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONNECTION, "close");
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
            let failed = |what: &str, e: &dyn std::error::Error| {
                format!("{method} {url}: {what}: {}", error_chain(e))
            };
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| failed("connect", &e))?;
            let response = match tls {
                Some(tls) => {
                    let name = rustls_pki_types::ServerName::try_from(host.clone())
                        .map_err(|e| failed("server name", &e))?;
                    let stream = tls
                        .connect(name, tcp)
                        .await
                        .map_err(|e| failed("TLS", &e))?;
                    send(TokioIo::new(stream), request).await
                }
                None => send(TokioIo::new(tcp), request).await,
            }
            .map_err(|e| failed("HTTP", &e))?;
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

async fn send<T>(
    io: T,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    sender.send_request(request).await
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
